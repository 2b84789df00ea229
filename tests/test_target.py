"""peagle.target: tokenizer, tiny target build/pretraining, target.json round trip, aux layer ids."""

from __future__ import annotations

import json
import random

import pytest
import torch

from peagle.target import (MASK_TOKEN, SPECIAL_TOKENS, TinyTargetConfig, build_tiny_target,
                           default_aux_layer_ids, load_target, make_tiny_target, pack_sequences,
                           pretrain_tiny_target,
                           read_target_json, render_prompt_ids, render_training_example,
                           resolve_hf_target, train_tokenizer, validate_aux_layer_ids,
                           write_target_json)

WORDS = ("the a cat dog sat on mat ran to park one two three four five plus minus equals answer "
         "def return print if else for while list sum value number code python").split()


def corpus(n: int, seed: int = 0) -> list[dict]:
    """Deterministic toy prompt records with arithmetic-flavoured references."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        recs.append({"id": f"r{i}", "turns": [f"What is {a} plus {b}? {words}"],
                     "reference": f"{a} plus {b} equals {a + b}. The answer is {a + b}."})
    return recs


def corpus_texts(recs: list[dict]) -> list[str]:
    return [r["turns"][0] for r in recs] + [r["reference"] for r in recs]


SMALL = dict(hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=2, intermediate_size=128,
             max_position_embeddings=256)


@pytest.fixture(scope="module")
def records():
    return corpus(160)


@pytest.fixture(scope="module")
def tokenizer(records):
    return train_tokenizer(corpus_texts(records), vocab_size=400)


def test_tokenizer_deterministic_roundtrip_and_chat_template(records, tokenizer, tmp_path):
    again = train_tokenizer(corpus_texts(records), vocab_size=400, out_dir=tmp_path / "tok")
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    # special tokens: fixed ids, mask token present and recognised as the tokenizer's mask token
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(6))
    assert tokenizer.mask_token == MASK_TOKEN and tokenizer.mask_token_id == 5
    assert MASK_TOKEN in tokenizer.get_vocab()
    text = "Hello wörld!\n\tdef f(x):  return x*2  # ünïcode ✓"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # chat template exactly as real models are driven
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                             add_generation_prompt=True, tokenize=False)
    assert rendered == "<|bos|><|user|>\nHi there\n<|assistant|>\n"
    ids = render_prompt_ids(tokenizer, "Hi there")
    assert ids[:2] == [1, 3] and ids[-2] == 4 and tokenizer.decode(ids) == rendered
    enc = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    assert list(enc["input_ids"]) == ids
    # saved copy loads through AutoTokenizer with the same template and special tokens
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert render_prompt_ids(loaded, "Hi there") == ids
    assert loaded.mask_token_id == 5 and loaded.eos_token_id == 2 and loaded.pad_token_id == 0
    cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in cfg
    # training example = prompt + reference + eos
    seq, plen = render_training_example(tokenizer, records[0])
    assert seq[:plen] == render_prompt_ids(tokenizer, records[0]["turns"][0]) and seq[-1] == 2
    assert render_training_example(tokenizer, {"id": "x", "turns": ["q"], "reference": None}) is None


def test_default_aux_layer_ids_distinct_and_valid():
    assert default_aux_layer_ids(4) == [1, 2, 3]
    assert default_aux_layer_ids(3) == [0, 1, 2]
    assert default_aux_layer_ids(32) == [2, 16, 29]  # vLLM's default where it does not collapse
    for L in range(3, 130):
        ids = default_aux_layer_ids(L)
        assert len(set(ids)) == 3 and all(0 <= i < L for i in ids) and ids == sorted(ids), (L, ids)
    with pytest.raises(ValueError, match="three distinct"):
        validate_aux_layer_ids([2, 2, 1], 4)
    with pytest.raises(ValueError, match="outside"):
        validate_aux_layer_ids([1, 2, 4], 4)
    assert validate_aux_layer_ids([3, 1, 2], 4) == [1, 2, 3]
    with pytest.raises(ValueError):
        default_aux_layer_ids(2)


def test_build_is_seeded_and_packing_isolates_documents(tokenizer):
    cfg = TinyTargetConfig(**SMALL, seed=3)
    m1, m2 = build_tiny_target(cfg, tokenizer), build_tiny_target(cfg, tokenizer)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    assert m1.config.vocab_size == len(tokenizer) and m1.config.head_dim == 32
    assert m1.config.num_hidden_layers == 4 and not m1.training
    # Packing: position ids restarting per document make transformers mask across documents,
    # so a packed block gives the same logits as each document alone.
    m = m1.double()
    docs = [[1, 7, 8, 9, 2], [1, 10, 11, 12, 13, 2], [1, 14, 15]]
    ids, pos, lab = pack_sequences(docs, [0, 0, 0], seq_len=14)
    assert ids.shape == (1, 14) and pos[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert lab[0, 0] == -100 and lab[0, 5] == -100 and lab[0, 11] == -100 and lab[0, 1] == 7
    with torch.no_grad():
        packed = m(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        start = 0
        for d in docs:
            alone = m(input_ids=torch.tensor([d]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(d)], alone, rtol=1e-9, atol=1e-9)
            start += len(d)
    # A document that does not fit starts the next block (never split); the rest is padding.
    ids, pos, lab = pack_sequences(docs, [0, 2, 0], seq_len=9, response_only_loss=True, pad_id=0)
    assert ids.tolist() == [[1, 7, 8, 9, 2, 0, 0, 0, 0], [1, 10, 11, 12, 13, 2, 1, 14, 15]]
    assert lab.tolist() == [[-100, 7, 8, 9, 2, -100, -100, -100, -100],
                            [-100, -100, 11, 12, 13, 2, -100, 14, 15]]
    assert pos[1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert pack_sequences([[1, 2, 3, 4, 5]], [0], seq_len=3)[0].tolist() == [[1, 2, 3]]  # truncated


def test_qwen3_moe_builds_through_the_same_path(tokenizer):
    cfg = TinyTargetConfig(architecture="qwen3_moe", **SMALL, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32)
    m = build_tiny_target(cfg, tokenizer)
    assert m.config.model_type == "qwen3_moe"
    out = m(input_ids=torch.tensor([[1, 5, 9]]), output_hidden_states=True)
    assert len(out.hidden_states) == 5
    with pytest.raises(ValueError, match="architecture"):
        TinyTargetConfig(architecture="gpt2").validate()


def test_pretrain_reduces_loss_and_target_json_roundtrip(records, tokenizer, tmp_path):
    torch.set_num_threads(2)
    model = build_tiny_target(TinyTargetConfig(**SMALL), tokenizer)
    logged = []
    metrics = pretrain_tiny_target(
        model, tokenizer, records[:140], records[140:], steps=25, seq_len=64, batch_size=4,
        lr=3e-3, warmup=3, seed=0, out_dir=tmp_path / "T", log=logged.append, log_every=5,
        progress=False)
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 1.0, metrics
    assert 0.0 <= metrics["heldout_next_token_accuracy"] <= 1.0
    assert metrics["heldout_records"] == 20 and metrics["tokens_seen"] == 25 * 4 * 64
    assert logged and logged[0]["step"] == 0
    assert (tmp_path / "T" / "model" / "model.safetensors").exists()
    assert (tmp_path / "T" / "pretrain_metrics.json").exists()

    tj = tmp_path / "T" / "target.json"
    info = write_target_json(tj, path=tmp_path / "T" / "model", kind="tiny", num_layers=4,
                             hidden_size=64, vocab_size=len(tokenizer), aux_layer_ids=None,
                             mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
                             heldout_next_token_accuracy=metrics["heldout_next_token_accuracy"],
                             architecture="llama")
    assert info["path"] == "model" and info["aux_layer_ids"] == [1, 2, 3]  # relative, movable
    m2, tok2, info2 = load_target(tj)
    assert info2 == read_target_json(tj) and not m2.training
    assert all(not p.requires_grad for p in m2.parameters())
    x = torch.tensor([render_training_example(tok2, records[150])[0]])
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    cfg = json.loads((tmp_path / "T" / "model" / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0  # portable for transformers-4 readers

    # a stored shape that disagrees with the model is caught on load
    bad = dict(info2, hidden_size=128)
    (tmp_path / "T" / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="hidden_size"):
        load_target(tmp_path / "T" / "bad.json")


def test_resolve_hf_target_offline(tmp_path):
    info = resolve_hf_target("meta-llama/Llama-3.1-8B-Instruct", tmp_path / "target.json",
                             num_layers=32, hidden_size=4096, vocab_size=128256,
                             mask_token_id=128002, eos_token_id=[128001, 128008, 128009])
    on_disk = json.loads((tmp_path / "target.json").read_text())
    assert on_disk == info and info["kind"] == "hf" and info["aux_layer_ids"] == [2, 16, 29]
    assert info["path"] == "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(ValueError, match="mask_token_id"):
        resolve_hf_target("x/y", tmp_path / "t2.json", num_layers=4, hidden_size=8, vocab_size=10,
                          mask_token_id=10)


def test_make_tiny_target_stage(records, tmp_path):
    info = make_tiny_target(tmp_path / "T", records[:100], records[100:110], TinyTargetConfig(**SMALL),
                            vocab_size=350, steps=3, seq_len=32, batch_size=2, lr=1e-3, warmup=1,
                            progress=False)
    assert info == read_target_json(tmp_path / "T" / "target.json")
    assert info["kind"] == "tiny" and info["path"] == "model" and info["mask_token_id"] == 5
    assert info["aux_layer_ids"] == [1, 2, 3] and info["eos_token_id"] == [2]  # eos_token_ids(): a list
    assert (tmp_path / "T" / "pretrain_log.jsonl").read_text().count("\n") >= 1
    model, tok, _ = load_target(tmp_path / "T" / "target.json")
    assert len(tok) == info["vocab_size"] and model.config.num_hidden_layers == 4


def test_recorded_target_is_reused_only_with_its_key_and_checksums(records, tmp_path):
    from peagle.config import PretrainConfig, TargetConfig
    from peagle.target.recorded import RecordError, record_key, record_target, reuse_recorded

    built = tmp_path / "built"
    make_tiny_target(built, records[:100], records[100:110], TinyTargetConfig(**SMALL), vocab_size=350,
                     steps=3, seq_len=32, batch_size=2, lr=1e-3, warmup=1, progress=False)
    manifest = {"files": {"train.jsonl": {"sha256": "a" * 64}, "eval_gsm8k.jsonl": {"sha256": "b" * 64}}}
    key = record_key(TargetConfig(recorded_dir="anywhere"), 0, manifest)
    assert record_key(TargetConfig(recorded_dir="elsewhere"), 0, manifest) == key  # where it lives is not a setting
    rec = tmp_path / "recorded" / "tiny-llama"
    meta = record_target(built, rec, key, commit="abc", command="peagle target --record")
    assert "model/model.safetensors" in meta["files"] and "target.json" in meta["files"]

    out = tmp_path / "run" / "tiny-llama"
    (out / "responses").mkdir(parents=True)
    (out / "responses" / "train.jsonl").write_text("later stage\n")
    reused, why = reuse_recorded(rec, out, key)
    assert reused and "abc" in why
    assert (out / "responses" / "train.jsonl").read_text() == "later stage\n"  # other outputs kept
    m1, _, _ = load_target(built / "target.json")
    m2, _, info = load_target(out / "target.json")
    assert info == read_target_json(built / "target.json")
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))

    other = record_key(TargetConfig(pretrain=PretrainConfig(steps=7)), 0, manifest)
    reused, why = reuse_recorded(rec, tmp_path / "x", other)
    assert not reused and "pretrain.steps (recorded 600, now 7)" in why and not (tmp_path / "x").exists()
    moved = {"files": {**manifest["files"], "train.jsonl": {"sha256": "c" * 64}}}
    assert "data_files.train.jsonl" in reuse_recorded(rec, tmp_path / "x", record_key(TargetConfig(), 0, moved))[1]
    assert not reuse_recorded(tmp_path / "none", tmp_path / "x", key)[0]

    weights = rec / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(RecordError, match=r"model\.safetensors: checksum differs .*make record-targets"):
        reuse_recorded(rec, tmp_path / "y", key)
