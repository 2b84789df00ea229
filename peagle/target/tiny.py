"""The tiny target: architecture config, random-init build, and the whole tiny-target stage."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from peagle.target.chat import _record_field
from peagle.target.hf import eos_token_ids
from peagle.target.info import write_target_json
from peagle.target.pretrain import pretrain_tiny_target
from peagle.target.tokenizer import train_tokenizer

# vLLM's CPU attention backend supports these head sizes (DESIGN §7).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass
class TinyTargetConfig:
    """Architecture of the tiny target. ``architecture`` is an HF ``model_type``.

    ``llama``, ``qwen3_moe`` and ``gpt_oss`` build through the same path (the MoE fields below map
    onto their HF configs). ``gpt_oss`` keeps the real model's structure shrunk: sliding-window
    attention on even layers and full attention on odd ones (the pattern vLLM also assumes),
    attention sinks, biased attention projections, top-k experts, YaRN RoPE scaling (factor 32 as
    in openai/gpt-oss-20b's config.json). ``extra`` is passed verbatim to ``AutoConfig.for_model``
    (overrides win).
    """

    architecture: str = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 768
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    seed: int = 0
    # qwen3_moe and gpt_oss (gpt_oss: moe_intermediate_size is each expert's width)
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 256
    # gpt_oss only: the window of its sliding-attention layers (128 in the real models)
    sliding_window: int = 128
    extra: dict[str, Any] = field(default_factory=dict)

    SUPPORTED = ("llama", "qwen3_moe", "gpt_oss")

    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.architecture not in self.SUPPORTED:
            raise ValueError(f"TinyTargetConfig.architecture={self.architecture!r} is not supported; "
                             f"use one of {self.SUPPORTED}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"TinyTargetConfig.hidden_size={self.hidden_size} must be divisible by "
                             f"num_heads={self.num_heads} (or set head_dim)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyTargetConfig.num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.num_layers < 1:
            raise ValueError("TinyTargetConfig.num_layers must be >= 1")
        if self.architecture == "gpt_oss" and self.sliding_window < 2:
            raise ValueError(f"TinyTargetConfig.sliding_window={self.sliding_window} must be >= 2")
        if self.resolved_head_dim() not in VLLM_CPU_HEAD_SIZES:
            # A warning, not an error: unit tests use smaller models that never meet vLLM.
            warnings.warn(f"tiny target head_dim={self.resolved_head_dim()} is not supported by vLLM's "
                          f"CPU backend {VLLM_CPU_HEAD_SIZES}; vLLM cross-checks will not run",
                          stacklevel=3)

    def hf_config_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
            head_dim=self.resolved_head_dim(), intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
            rms_norm_eps=self.rms_norm_eps, tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range, hidden_act="silu",
        )
        if self.architecture == "qwen3_moe":
            kw.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                      moe_intermediate_size=self.moe_intermediate_size, decoder_sparse_step=1,
                      mlp_only_layers=[], norm_topk_prob=True, use_sliding_window=False)
        if self.architecture == "gpt_oss":
            orig = max(16, self.max_position_embeddings // 32)
            kw.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                      intermediate_size=self.moe_intermediate_size, sliding_window=self.sliding_window,
                      layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                   for i in range(self.num_layers)],
                      attention_bias=True, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "yarn", "rope_theta": float(self.rope_theta),
                                       "factor": self.max_position_embeddings / orig, "beta_fast": 32.0,
                                       "beta_slow": 1.0, "truncate": False,
                                       "original_max_position_embeddings": orig})
        kw.update(self.extra)
        return kw

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TinyTargetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TinyTargetConfig: unknown field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


def build_tiny_target(cfg: TinyTargetConfig, tokenizer):
    """Random-init (seeded by ``cfg.seed``, global RNG untouched) HF causal LM in fp32, eval mode.

    Vocabulary size and the bos/eos/pad ids come from ``tokenizer``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from peagle.target.hf import resolve_attn_implementation

    cfg.validate()
    hf_cfg = AutoConfig.for_model(
        cfg.architecture, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **cfg.hf_config_kwargs())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(
            hf_cfg, attn_implementation=resolve_attn_implementation(cfg.architecture), dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model.eval()


def pretrain_configured_target(tc, seed: int, data_dir: str | Path, out_dir: str | Path, *, heldout_sets: Sequence[str],
                               num_threads: int | None = None, steps: int | None = None) -> dict[str, Any]:
    """:func:`make_tiny_target` for a profile's target ``tc`` (a ``peagle.config.TargetConfig``):
    its architecture and pretraining settings, the prompts of ``data_dir`` (``train.jsonl``, and
    ``eval_{set}.jsonl`` for the held-out accuracy). ``steps`` overrides ``tc.pretrain.steps``."""
    from peagle.data.schema import read_prompts

    data = Path(data_dir)
    arch = TinyTargetConfig(architecture=tc.architecture, hidden_size=tc.hidden_size, num_layers=tc.num_layers,
                            num_heads=tc.num_heads, num_kv_heads=tc.num_kv_heads,
                            intermediate_size=tc.intermediate_size,
                            max_position_embeddings=tc.max_position_embeddings, seed=seed,
                            num_experts=tc.num_experts, num_experts_per_tok=tc.num_experts_per_tok,
                            moe_intermediate_size=tc.moe_intermediate_size, sliding_window=tc.sliding_window)
    p = tc.pretrain
    heldout = [r for s in heldout_sets for r in read_prompts(data / f"eval_{s}.jsonl")]
    return make_tiny_target(out_dir, read_prompts(data / "train.jsonl"), heldout, arch,
                            vocab_size=p.tokenizer_vocab_size, steps=p.steps if steps is None else steps,
                            seq_len=p.seq_len, batch_size=p.batch_size, lr=p.lr, warmup=p.warmup_steps,
                            seed=seed, aux_layer_ids=tc.aux_layer_ids, name=tc.name, num_threads=num_threads)


def make_tiny_target(out_dir: str | Path, train_records: Sequence[Any], eval_records: Sequence[Any],
                     arch: TinyTargetConfig, *, vocab_size: int, steps: int, seq_len: int,
                     batch_size: int, lr: float, warmup: int, seed: int = 0,
                     aux_layer_ids: Sequence[int] | None = None, name: str = "tiny-llama",
                     num_threads: int | None = None, progress: bool = True,
                     **pretrain_kw: Any) -> dict[str, Any]:
    """The whole tiny-target stage: tokenizer on the training prompts + references, build,
    pretrain, save ``out_dir/model``, write ``out_dir/target.json``; returns its contents.

    ``aux_layer_ids=None`` takes ``default_aux_layer_ids``. Extra keywords go to
    ``pretrain_tiny_target``. This is what ``peagle target`` runs for a tiny profile target;
    ``eos_token_id`` is the list of :func:`eos_token_ids` and ``pretrain`` the full metrics.
    """
    out_dir = Path(out_dir)
    texts: list[str] = []
    for r in train_records:
        turns = _record_field(r, "turns") or []
        texts.extend(t for t in turns if t)
        ref = _record_field(r, "reference")
        if ref:
            texts.append(ref)
    tokenizer = train_tokenizer(texts, vocab_size, model_max_length=arch.max_position_embeddings)
    model = build_tiny_target(arch, tokenizer)
    metrics = pretrain_tiny_target(
        model, tokenizer, train_records, eval_records, steps=steps, seq_len=seq_len,
        batch_size=batch_size, lr=lr, warmup=warmup, seed=seed, out_dir=out_dir,
        log=out_dir / "pretrain_log.jsonl", num_threads=num_threads, progress=progress,
        **pretrain_kw)
    cfg = model.config
    return write_target_json(
        out_dir / "target.json", path=out_dir / "model", kind="tiny",
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        vocab_size=model.get_output_embeddings().weight.shape[0],
        aux_layer_ids=aux_layer_ids, mask_token_id=tokenizer.mask_token_id,
        eos_token_id=eos_token_ids(model, tokenizer),
        heldout_next_token_accuracy=metrics["heldout_next_token_accuracy"], name=name,
        architecture=arch.architecture, max_position_embeddings=arch.max_position_embeddings,
        pretrain=metrics, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=arch.resolved_head_dim(),
        intermediate_size=arch.intermediate_size, rope_theta=arch.rope_theta,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        num_parameters=metrics["num_parameters"],
        **({"sliding_window": arch.sliding_window} if arch.architecture == "gpt_oss" else {}))
