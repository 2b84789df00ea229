import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def tiny_llama():
    """A random 2-layer Llama target in float64 (exact comparisons), vocab 97."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """A tiny target (random weights, local tokenizer), responses and extracted hidden states.

    Returns dict(target_json, hidden_dir, responses, root). Built once per test session (~seconds).
    """
    import json

    from peagle.hidden import extract_hidden_states
    from peagle.target import (TinyTargetConfig, build_tiny_target, eos_token_ids, save_target_model,
                               train_tokenizer, write_target_json)

    root = tmp_path_factory.mktemp("tiny")
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]
    tok = train_tokenizer(texts, 300)
    model = build_tiny_target(TinyTargetConfig(hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=2,
                                               intermediate_size=128, max_position_embeddings=256, seed=0), tok)
    save_target_model(model, tok, root / "model")
    target_json = root / "target.json"
    write_target_json(target_json, path=str(root / "model"), kind="tiny", num_layers=4, hidden_size=64,
                      vocab_size=model.get_output_embeddings().weight.shape[0], aux_layer_ids=[1, 2, 3],
                      mask_token_id=tok.mask_token_id, eos_token_id=eos_token_ids(model, tok),
                      max_position_embeddings=256)
    g = torch.Generator().manual_seed(0)
    responses = root / "responses.jsonl"
    with responses.open("w") as f:
        for i in range(12):
            p = torch.randint(10, 290, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g).tolist()
            r = torch.randint(10, 290, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
            f.write(json.dumps({"id": f"s{i}", "prompt_ids": p, "response_ids": r}) + "\n")
    extract_hidden_states(model.eval(), responses, [1, 2, 3], root / "hidden", shard_tokens=150,
                          dtype="float32", target_name="tiny-test", progress=False)
    return {"target_json": target_json, "hidden_dir": root / "hidden", "responses": responses, "root": root}


@pytest.fixture(scope="session")
def tiny_config():
    """config/tiny.yaml shrunk to test sizes (a frozen Config: tests change it with ``replace``)."""
    from pathlib import Path

    from peagle.config import config_from_dict, read_config_files

    root = Path(__file__).resolve().parents[1]
    raw = read_config_files(root / "config" / "tiny.yaml")
    raw["drafter"].update(num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=96)
    raw["train"].update(k_train=4, epochs=2, grad_accum=3, max_mask_len=128, checkpoint_every=2, lr=3e-3)
    # No RLIMIT_AS in the pytest process: budgets are tested in subprocesses (tests/test_memory.py).
    raw["train"]["memory_budget_mb"] = None
    raw["eval"].update(k=3, max_new_tokens=12, n_prompts=2, lossless_check_prompts=1)
    raw["ablations"] = {}  # the profile's ablations evaluate at K=5, above this k_train (tests/test_ablations.py)
    return config_from_dict(raw)
