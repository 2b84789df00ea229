"""Drafter checkpoints in the *speculators* format (DESIGN §7), read into and written from this suite.

vllm-project/speculators, SpecForge and NeMo AutoModel write an EAGLE-3 or P-EAGLE drafter as
``config.json`` with ``speculators_model_type`` ("eagle3" / "peagle"), a full Llama
``transformer_layer_config``, ``speculators_config`` (``proposal_methods[0].speculative_tokens``,
``verifier.name_or_path``), ``draft_vocab_size``, ``target_hidden_size``, ``norm_before_residual``,
``eagle_aux_hidden_state_layer_ids`` and, for P-EAGLE, ``mask_token_id``; and ``model.safetensors``
with the same tensor names as this suite's drafter (``fc.weight``, ``embed_tokens.weight``,
``layers.N.*`` with ``layers.0.hidden_norm.weight``, ``norm.weight``, ``lm_head.weight``,
``mask_hidden`` [1, 1, 3H]) plus ``d2t``/``t2d`` when the draft vocabulary is reduced.

Only what :class:`peagle.drafters.PEagleDrafter` computes is accepted: a Llama decoder (no Qwen3
q/k norms, no biases, SiLU, plain RoPE), ``norm_before_residual: false``, no ``norm_before_fc`` /
``fc_norm`` / ``norm_output``, and the full target vocabulary (the engine drafts target ids
directly; a reduced draft vocabulary is refused). Everything is checked on the config, before any
weights are read; errors are :class:`peagle.drafter_files.CheckpointError` (also ``peagle.checkpoint.CheckpointError``) naming the file and field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from peagle.drafter_files import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from peagle.drafters import DrafterSpec, PEagleDrafter

MODEL_TYPES = {"eagle3": False, "peagle": True}  # speculators_model_type -> parallel
ARCHITECTURES = {"eagle3": "Eagle3Speculator", "peagle": "PEagleSpeculator"}
# Flags of speculators' drafters that change the function computed; this suite has none of them.
UNSUPPORTED_FLAGS = ("norm_before_fc", "fc_norm", "norm_output")
# Tensors some writers keep that the drafter never uses at inference.
IGNORED_TENSORS = ("verifier_lm_head.weight", "verifier_norm.weight")


def is_speculators_config(cfg: Any) -> bool:
    """True for a speculators-format config.json (it names its ``speculators_model_type``)."""
    return isinstance(cfg, dict) and "speculators_model_type" in cfg


def _error(path: Path, msg: str):
    return CheckpointError(f"{path}: speculators config {msg}")


def _config_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name == "config.json" else path / "config.json"


def _int(path: Path, value: Any, field: str, minimum: int = 1) -> int:
    if type(value) is not int or value < minimum:
        raise _error(path, f"has {field}={value!r}; expected an integer >= {minimum}")
    return value


def spec_from_speculators(cfg: dict[str, Any], path: str | Path) -> tuple[DrafterSpec, dict[str, Any]]:
    """A speculators config -> (this suite's DrafterSpec, meta for the ``peagle`` block).

    ``path``: the checkpoint directory or its config.json (named in errors). ``meta`` holds
    ``format`` ("speculators"), ``method`` ("peagle"/"eagle3"), ``k_train`` (the trained depths,
    ``speculative_tokens``, for P-EAGLE; None for EAGLE-3, which drafts any K), ``verifier``.
    """
    path = _config_path(path)
    kind = cfg.get("speculators_model_type")
    if kind not in MODEL_TYPES:
        raise _error(path, f"has speculators_model_type={kind!r}; this suite reads {sorted(MODEL_TYPES)}")
    parallel = MODEL_TYPES[kind]
    sc = cfg.get("speculators_config")
    if not isinstance(sc, dict):
        raise _error(path, "has no speculators_config block")
    methods = sc.get("proposal_methods")
    if not (isinstance(methods, list) and methods and isinstance(methods[0], dict)
            and "speculative_tokens" in methods[0]):
        raise _error(path, "has no speculators_config.proposal_methods[0].speculative_tokens")
    tokens = _int(path, methods[0]["speculative_tokens"], "speculators_config.proposal_methods[0].speculative_tokens")
    if not (isinstance(sc.get("verifier"), dict) and "name_or_path" in sc["verifier"]):
        raise _error(path, "has no speculators_config.verifier.name_or_path")
    tl = cfg.get("transformer_layer_config")
    if not isinstance(tl, dict):
        raise _error(path, "has no transformer_layer_config (a full Llama config dict)")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if key not in tl:
            raise _error(path, f"has no transformer_layer_config.{key} (vLLM needs the full decoder config, "
                               f"not a diff)")
        _int(path, tl[key], f"transformer_layer_config.{key}")
    hidden, heads, vocab = tl["hidden_size"], tl["num_attention_heads"], tl["vocab_size"]
    kv_heads = _int(path, tl.get("num_key_value_heads", heads), "transformer_layer_config.num_key_value_heads")
    head_dim = tl.get("head_dim") or hidden // heads
    _int(path, head_dim, "transformer_layer_config.head_dim")
    if heads % kv_heads:
        raise _error(path, f"has transformer_layer_config.num_attention_heads={heads}, not a multiple of "
                           f"num_key_value_heads={kv_heads}")

    # What the suite's drafter computes; anything else would silently be another function.
    checks = [("model_type", tl.get("model_type", "llama"), "llama"),
              ("hidden_act", tl.get("hidden_act", "silu"), "silu"),
              ("attention_bias", tl.get("attention_bias", False), False),
              ("mlp_bias", tl.get("mlp_bias", False), False)]
    for key, got, want in checks:
        if got != want:
            raise _error(path, f"has transformer_layer_config.{key}={got!r}; this suite's drafter is a Llama "
                               f"decoder with {key}={want!r}")
    rope = tl.get("rope_parameters") if isinstance(tl.get("rope_parameters"), dict) else {}
    rope_type = rope.get("rope_type") or (tl.get("rope_scaling") or {}).get("rope_type") or "default"
    if rope_type != "default":
        raise _error(path, f"has transformer_layer_config rope_type={rope_type!r}; only plain RoPE (default) "
                           f"is implemented")
    rope_theta = tl.get("rope_theta", rope.get("rope_theta", 10000.0))

    if "norm_before_residual" not in cfg:
        raise _error(path, "has no norm_before_residual (vLLM's default differs between eagle3 and peagle; "
                           "write it explicitly)")
    if cfg["norm_before_residual"] is not False:
        raise _error(path, f"has norm_before_residual={cfg['norm_before_residual']!r}; this suite's drafter "
                           f"implements only false (residual = un-normed hidden half)")
    for flag in UNSUPPORTED_FLAGS:
        if cfg.get(flag):
            raise _error(path, f"has {flag}={cfg[flag]!r}; this suite's drafter does not implement it")
    draft_vocab = cfg.get("draft_vocab_size")
    if draft_vocab is None:
        raise _error(path, "has no draft_vocab_size")
    _int(path, draft_vocab, "draft_vocab_size")
    if draft_vocab != vocab:
        raise _error(path, f"has draft_vocab_size={draft_vocab} < transformer_layer_config.vocab_size={vocab}: "
                           f"a reduced draft vocabulary (d2t map) is not supported by this suite's engine, "
                           f"which drafts target ids directly")
    target_hidden = cfg.get("target_hidden_size")
    if target_hidden is not None and target_hidden != hidden:
        raise _error(path, f"has target_hidden_size={target_hidden} != transformer_layer_config.hidden_size="
                           f"{hidden}; this suite's drafter has the target's width")
    aux = cfg.get("eagle_aux_hidden_state_layer_ids")
    if not (isinstance(aux, list) and len(aux) == 3 and all(type(i) is int and i >= 0 for i in aux)
            and len(set(aux)) == 3):
        raise _error(path, f"has eagle_aux_hidden_state_layer_ids={aux!r}; expected three distinct layer ids")
    mask = cfg.get("mask_token_id")
    if parallel:
        if mask is None:
            raise _error(path, "has no mask_token_id (required for speculators_model_type 'peagle')")
        if type(mask) is not int or not 0 <= mask < vocab:
            raise _error(path, f"has mask_token_id={mask!r}, outside the vocabulary [0, {vocab})")
    spec = DrafterSpec(
        hidden_size=hidden, vocab_size=vocab, num_layers=tl["num_hidden_layers"], num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=tl["intermediate_size"],
        mask_token_id=mask if type(mask) is int else 0, aux_layer_ids=list(aux),
        rms_norm_eps=float(tl.get("rms_norm_eps", 1e-6)), rope_theta=float(rope_theta),
        max_position_embeddings=int(tl.get("max_position_embeddings", 2048)), parallel=parallel)
    meta = {"format": "speculators", "method": kind, "k_train": tokens if parallel else None,
            "speculative_tokens": tokens, "verifier": sc["verifier"]["name_or_path"],
            "speculators_version": cfg.get("speculators_version")}
    return spec, meta


def state_dict_from_speculators(tensors: dict[str, torch.Tensor], spec: DrafterSpec,
                                path: str | Path) -> dict[str, torch.Tensor]:
    """speculators tensor names -> :meth:`PEagleDrafter.state_dict` names (``path``: the weights file).

    ``midlayer.*`` (older writers' layer 0) becomes ``layers.0.*``; an identity ``d2t``/``t2d`` is
    dropped; a non-identity mapping, a missing tensor or an unexpected one is an error.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in IGNORED_TENSORS:
            continue
        if name == "d2t":
            if bool(t.ne(0).any()):
                raise CheckpointError(f"{path}: d2t maps draft ids to other target ids; this suite's engine "
                                      f"drafts target ids directly (no vocabulary mapping)")
            continue
        if name == "t2d":
            if not bool(t.bool().all()):
                raise CheckpointError(f"{path}: t2d selects a reduced draft vocabulary; not supported")
            continue
        out[name.replace("midlayer.", "layers.0.", 1) if name.startswith("midlayer.") else name] = t
    expected = _expected_names(spec)
    missing, unexpected = sorted(expected - set(out)), sorted(set(out) - expected)
    if missing or unexpected:
        hint = " (speculators fills embed_tokens from the verifier; this suite needs it in the checkpoint)" \
            if "embed_tokens.weight" in missing else ""
        raise CheckpointError(f"{path}: tensors do not match the speculators config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}){hint}")
    return out


def _expected_names(spec: DrafterSpec) -> set[str]:
    with torch.device("meta"):
        return set(PEagleDrafter(spec).state_dict())


def speculators_config(spec: DrafterSpec, *, verifier: str, k_train: int) -> dict[str, Any]:
    """config.json of a speculators-format export of a suite drafter (full transformer_layer_config)."""
    kind = "peagle" if spec.parallel else "eagle3"
    layer = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim, "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings, "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta, "rope_parameters": {"rope_theta": spec.rope_theta, "rope_type": "default"},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": False,
        "initializer_range": 0.02, "use_cache": True, "pretraining_tp": 1,
    }
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[kind]],
        "speculators_model_type": kind,
        "speculators_config": {
            "algorithm": kind,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(k_train)}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": []},
        },
        "transformer_layer_config": layer,
        "draft_vocab_size": spec.vocab_size,
        "target_hidden_size": spec.hidden_size,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "eagle_aux_hidden_state_layer_ids": list(spec.aux_layer_ids),
        "embed_requires_grad": spec.parallel,
        "torch_dtype": "float32",
    }
    if spec.parallel:
        cfg["mask_token_id"] = spec.mask_token_id
    return cfg


def save_speculators(model: PEagleDrafter, directory: str | Path, *, verifier: str, k_train: int) -> Path:
    """Write ``model`` as a speculators-format checkpoint (config.json + model.safetensors), atomically.

    ``verifier``: the target's name or path (``speculators_config.verifier.name_or_path``);
    ``k_train``: ``speculative_tokens`` (the trained depths of a P-EAGLE drafter).
    """
    from safetensors.torch import save_file

    from peagle.io import atomic_dir

    final = Path(directory)
    with atomic_dir(final) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        cfg = speculators_config(model.spec, verifier=verifier, k_train=k_train)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return final
