"""Loading targets at their real size: device plans, embeddings without the model, bad settings."""

import pytest
import torch

from peagle.config import TargetConfig
from peagle.target import (check_hf_target, check_quantization, plan_device_map, read_embedding_tensors,
                           resolve_attn_implementation)


def gpt_oss_120b_config():
    """openai/gpt-oss-120b's config.json shape (36 layers, 128 experts top-4, hidden 2880, ...)."""
    from transformers import GptOssConfig

    return GptOssConfig(num_hidden_layers=36, num_local_experts=128, num_experts_per_tok=4, vocab_size=201088,
                        hidden_size=2880, intermediate_size=2880, head_dim=64, num_attention_heads=64,
                        num_key_value_heads=8, sliding_window=128, tie_word_embeddings=False)


def test_gpt_oss_120b_fits_on_eight_h200s_not_one():
    cfg = gpt_oss_120b_config()
    plan = plan_device_map(cfg, dtype="bfloat16", num_devices=8, max_memory_gib=140)
    params = plan.weight_bytes / 2
    assert params == pytest.approx(116.83e9, rel=0.01)  # the model card's total parameter count
    assert plan.weight_bytes / 2**30 == pytest.approx(217.6, rel=0.01)  # ~234 GB in bf16
    assert plan.device_map is not None and 2 <= plan.num_devices <= 8
    assert max(plan.per_device_bytes) <= 0.9 * 140 * 2**30
    assert set(plan.device_map.values()) == set(range(plan.num_devices))
    assert all(f"model.layers.{i}" in plan.device_map for i in range(36))
    with pytest.raises(ValueError, match=r"do not fit on 1 device.*target\.num_devices"):
        plan_device_map(cfg, dtype="bfloat16", num_devices=1, max_memory_gib=140)
    small = plan_device_map(cfg, dtype="bfloat16", num_devices=8, max_memory_gib=None)
    assert small.device_map is None


def test_attention_implementation_per_architecture():
    assert resolve_attn_implementation("gpt_oss") == "eager"
    assert resolve_attn_implementation("llama") == "sdpa" and resolve_attn_implementation("qwen3_moe") == "sdpa"
    assert resolve_attn_implementation("gpt_oss", "flex_attention") == "flex_attention"
    with pytest.raises(ValueError, match="target.attn_implementation"):
        resolve_attn_implementation("gpt_oss", "sdpa", target="target 'gpt-oss-20b'")


def test_quantized_checkpoint_names_the_missing_package():
    cfg = gpt_oss_120b_config()
    cfg.quantization_config = {"quant_method": "mxfp4"}
    assert check_quantization(cfg) == "mxfp4"  # dequantizes without extra packages
    cfg.quantization_config = {"quant_method": "bitsandbytes"}
    with pytest.raises(ImportError, match="bitsandbytes"):
        check_quantization(cfg, target="target 'x'")


def test_trainer_reads_only_embedding_and_head(tiny_artifacts, tmp_path, monkeypatch):
    """The embedding and LM head come straight from a sharded checkpoint's index: only those two
    tensors are read, and the bytes read are a small share of the checkpoint."""
    import json
    import shutil

    import safetensors

    from peagle.target import load_target, write_target_json

    model, _, info = load_target(tiny_artifacts["target_json"])
    sharded = tmp_path / "model"
    model.save_pretrained(sharded, max_shard_size="100KB")
    for f in (tiny_artifacts["root"] / "model").glob("tok*"):
        shutil.copy(f, sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    tj = tmp_path / "target.json"
    write_target_json(tj, **{k: info[k] for k in ("kind", "num_layers", "hidden_size", "vocab_size",
                                                  "aux_layer_ids", "mask_token_id", "eos_token_id")},
                      path=str(sharded))
    read = []
    real = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def get_tensor(self, name):
            t = self.f.get_tensor(name)
            read.append((name, t.numel() * t.element_size()))
            return t

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    embed, head = read_embedding_tensors(tj)
    assert sorted(n for n, _ in read) == ["lm_head.weight", "model.embed_tokens.weight"]
    total = sum(f.stat().st_size for f in sharded.glob("*.safetensors"))
    assert sum(b for _, b in read) < 0.2 * total
    assert torch.equal(embed, model.get_input_embeddings().weight)
    assert torch.equal(head, model.get_output_embeddings().weight)
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 2


def test_profile_settings_are_checked_before_any_job(tiny_artifacts):
    model_dir = str(tiny_artifacts["root"] / "model")  # a llama with 4 layers, hidden 64
    base = dict(kind="hf", name="t", path=model_dir, architecture="llama", hidden_size=64, num_layers=4,
                num_heads=2, num_kv_heads=2)
    assert check_hf_target(TargetConfig(**base)) is None
    plan = check_hf_target(TargetConfig(**base, max_memory_gib=1.0))
    assert plan.num_devices == 1
    with pytest.raises(ValueError, match=r"target 't'.*target\.num_devices or target\.max_memory_gib"):
        check_hf_target(TargetConfig(**base, max_memory_gib=1e-4))
    with pytest.raises(ValueError, match=r"target 't'.*target\.architecture"):
        check_hf_target(TargetConfig(**{**base, "architecture": "qwen3_moe"}))
    with pytest.raises(ValueError, match=r"target 't'.*target\.num_layers"):
        check_hf_target(TargetConfig(**{**base, "num_layers": 8, "aux_layer_ids": [2, 4, 6]}))
    with pytest.raises(ValueError, match=r"target 't'.*target\.attn_implementation"):
        check_hf_target(TargetConfig(**{**base, "architecture": "gpt_oss", "attn_implementation": "sdpa"}))


def test_aux_ids_beyond_the_target_are_a_clear_error_at_load(tiny_artifacts, tmp_path):
    import json

    from peagle.target import load_target

    info = json.loads(tiny_artifacts["target_json"].read_text())
    info.update(num_layers=8, aux_layer_ids=[2, 4, 6], path=str(tiny_artifacts["root"] / "model"))
    (tmp_path / "t.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"target.aux_layer_ids: ids \[4, 6\] outside \[0, 4\)"):
        load_target(tmp_path / "t.json")
