"""Drafter checkpoints in the plain Hugging Face layout vLLM loads (DESIGN §7).

A checkpoint directory holds ``config.json`` (vLLM's ``LlamaForCausalLMEagle3`` keys plus a
``peagle`` block with what this suite needs to rebuild and audit the drafter) and
``model.safetensors`` with vLLM's parameter names (no ``model.`` prefix). Training checkpoints
add ``trainer_state.pt``. Directories are written under a temporary name and renamed into place,
so a killed run never leaves a half-written checkpoint that looks complete.

``save_drafter`` records checksums of the weights in the ``peagle`` block (``weights_sha256``: the
file; ``tensors_sha256``: names, dtypes, shapes and bytes of the tensors, so that a re-serialised
copy with the same weights still verifies); ``load_drafter`` and ``check_export`` verify them.
``read_config``/``load_drafter`` also read the *speculators* format (:mod:`peagle.speculators`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from peagle.drafter_files import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, CheckpointError
from peagle.drafters import DrafterSpec, PEagleDrafter
from peagle.io import atomic_dir, read_json, sha256_file
from peagle.speculators import is_speculators_config, spec_from_speculators, state_dict_from_speculators

MASK_TOKEN_KEYS = ("mask_token_id", "pard_token", "ptd_token_id")


def vllm_config(spec: DrafterSpec, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json for vLLM's EAGLE-3 loader (method ``eagle3`` for both kinds).

    P-EAGLE: the mask token under every key some vLLM version reads. EAGLE-3 (``spec.parallel``
    False): none of them, so nothing marks the checkpoint as a parallel drafter.
    """
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "target_hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.max_position_embeddings,
        "vocab_size": spec.vocab_size,
        "draft_vocab_size": spec.vocab_size,
        "tie_word_embeddings": False,
        "norm_before_residual": False,
        "eagle_aux_hidden_state_layer_ids": list(spec.aux_layer_ids),
        **({key: spec.mask_token_id for key in MASK_TOKEN_KEYS} if spec.parallel else {}),
        "torch_dtype": "float32",
        "peagle": {"spec": spec.to_dict(), **meta},
    }


def save_drafter(directory: str | Path, model: PEagleDrafter, meta: dict[str, Any],
                 trainer_state: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json + model.safetensors (+ trainer_state.pt) atomically into ``directory``.

    ``tensors``: the model's whole state dict when ``model`` holds only its shards (FSDP).
    """
    final = Path(directory)
    state = model.state_dict() if tensors is None else tensors
    with atomic_dir(final) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        meta = {**meta, "weights_sha256": sha256_file(tmp / WEIGHTS_NAME), "tensors_sha256": tensors_digest(tensors)}
        (tmp / CONFIG_NAME).write_text(json.dumps(vllm_config(model.spec, meta), indent=2) + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_NAME)
    return final


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names (``midlayer.*`` read as ``layers.0.*``), dtypes, shapes and bytes."""
    canon = {(n.replace("midlayer.", "layers.0.", 1) if n.startswith("midlayer.") else n): n for n in tensors}
    h = hashlib.sha256()
    for name in sorted(canon):
        t = tensors[canon[name]].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: weights file missing")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: unreadable ({err})") from None


def verify_weights(directory: str | Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Check model.safetensors against the checksums save_drafter recorded (nothing to do without them).

    The file's sha256 is tried first; a file whose bytes differ but whose tensors are the same
    (re-serialised, ``midlayer.*`` names) still passes on ``tensors_sha256``.
    """
    block = cfg.get("peagle") if isinstance(cfg.get("peagle"), dict) else {}
    want = block.get("weights_sha256")
    if not want:
        return
    path = Path(directory) / WEIGHTS_NAME
    got = sha256_file(path)
    if got == want:
        return
    want_tensors = block.get("tensors_sha256")
    if want_tensors and tensors_digest(tensors if tensors is not None else _load_weights(path)) == want_tensors:
        return
    raise CheckpointError(f"{path}: sha256 {got[:16]}... does not match peagle.weights_sha256 {want[:16]}... "
                          f"recorded in {Path(directory) / CONFIG_NAME}: the weights are corrupt or were "
                          f"changed after export; copy or export the drafter again")


def read_config(directory: str | Path) -> dict[str, Any]:
    """config.json in this suite's view: a peagle checkpoint's as written; a speculators one converted
    (:func:`vllm_config` of its spec, ``peagle.format`` "speculators"; the file itself is unchanged)."""
    path = Path(directory) / CONFIG_NAME
    cfg = read_json(path, CheckpointError, f"no drafter config (is {directory} a drafter checkpoint directory?)")
    if is_speculators_config(cfg):
        spec, meta = spec_from_speculators(cfg, path)
        return vllm_config(spec, meta)
    if not isinstance(cfg, dict) or "peagle" not in cfg or "spec" not in cfg["peagle"]:
        raise CheckpointError(f"{path}: missing the 'peagle.spec' block written by peagle's save_drafter, and no "
                              f"'speculators_model_type' (the speculators format): not a drafter checkpoint "
                              f"this suite reads")
    return cfg


def drafter_format(cfg: dict[str, Any]) -> str:
    """``peagle`` or ``speculators``, for a config returned by :func:`read_config`."""
    return cfg["peagle"].get("format", "peagle")


def load_drafter(directory: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[PEagleDrafter, dict[str, Any]]:
    """Rebuild a drafter from a checkpoint directory (either format); returns (model, read_config)."""
    directory = Path(directory)
    cfg = read_config(directory)
    spec = DrafterSpec(**cfg["peagle"]["spec"])
    path = directory / WEIGHTS_NAME
    state = _load_weights(path)
    if drafter_format(cfg) == "speculators":
        state = state_dict_from_speculators(state, spec, path)
    else:
        verify_weights(directory, cfg, state)
    model = PEagleDrafter(spec)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: tensor shapes do not match the config ({err})") from None
    return model.to(device=device, dtype=dtype).eval(), cfg


_POSITIVE_INT_KEYS = ("hidden_size", "target_hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                      "vocab_size", "draft_vocab_size")


def _expected_shapes(cfg: dict[str, Any], parallel: bool) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that vLLM's LlamaForCausalLMEagle3 loader expects for ``cfg``."""
    h, th, inter = cfg["hidden_size"], cfg["target_hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"fc.weight": (h, 3 * th), "embed_tokens.weight": (cfg["vocab_size"], h), "norm.weight": (h,),
              "lm_head.weight": (cfg["draft_vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        pre, width = f"layers.{i}.", 2 * h if i == 0 else h  # layer 0 reads [embed, hidden]
        shapes.update({pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
                       pre + "self_attn.q_proj.weight": (q, width), pre + "self_attn.k_proj.weight": (kv, width),
                       pre + "self_attn.v_proj.weight": (kv, width), pre + "self_attn.o_proj.weight": (h, q),
                       pre + "mlp.gate_proj.weight": (inter, h), pre + "mlp.up_proj.weight": (inter, h),
                       pre + "mlp.down_proj.weight": (h, inter)})
    shapes["layers.0.hidden_norm.weight"] = (h,)
    if parallel:
        shapes["mask_hidden"] = (1, 1, 3 * th)
    return shapes


def check_export(directory: str | Path) -> None:
    """Validate a drafter checkpoint the way vLLM will read it, without vLLM (DESIGN §7).

    config.json: architecture, positive decoder sizes, three distinct non-negative aux layer ids,
    and the mask token under all of ``mask_token_id``/``pard_token``/``ptd_token_id`` iff the
    drafter is parallel (``peagle.spec.parallel``; without that block, iff any key is present).
    model.safetensors: exactly the tensor names vLLM maps (``midlayer.*`` accepted for layer 0;
    ``d2t`` [draft_vocab] required when the draft vocabulary is smaller, ``t2d`` optional) with
    shapes consistent with the config and floating dtypes; ``mask_hidden`` [1, 1, 3H] present
    iff parallel; then the recorded weight checksums (:func:`verify_weights`). Raises
    :class:`CheckpointError` naming the file and every problem found there.
    """
    from safetensors import safe_open

    directory = Path(directory)
    path = directory / CONFIG_NAME
    cfg = read_json(path, CheckpointError)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    problems = []
    if cfg.get("architectures") != ["LlamaForCausalLMEagle3"]:
        problems.append(f"architectures is {cfg.get('architectures')!r}, expected ['LlamaForCausalLMEagle3']")
    for key in _POSITIVE_INT_KEYS + ("rms_norm_eps", "rope_theta"):
        val = cfg.get(key)
        ok = (type(val) is int) if key in _POSITIVE_INT_KEYS else isinstance(val, (int, float))
        if not ok or isinstance(val, bool) or val <= 0:
            problems.append(f"{key} is {val!r}, expected a positive {'int' if key in _POSITIVE_INT_KEYS else 'number'}")
    if not problems:
        if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
            problems.append("num_attention_heads is not a multiple of num_key_value_heads")
        if cfg["draft_vocab_size"] > cfg["vocab_size"]:
            problems.append("draft_vocab_size exceeds vocab_size")
    # What this suite's drafter computes; vLLM would silently run a different function otherwise.
    for key, want in (("hidden_act", "silu"), ("norm_before_residual", False), ("tie_word_embeddings", False)):
        if cfg.get(key, want) != want:
            problems.append(f"{key} is {cfg[key]!r}, the drafter was built with {want!r}")
    aux = cfg.get("eagle_aux_hidden_state_layer_ids")
    if not (isinstance(aux, list) and len(aux) == 3 and all(type(i) is int and i >= 0 for i in aux)
            and len(set(aux)) == 3):
        problems.append(f"eagle_aux_hidden_state_layer_ids is {aux!r}, expected three distinct layer ids "
                        "(vLLM dedups repeated ids)")
    spec = cfg.get("peagle", {}).get("spec", {}) if isinstance(cfg.get("peagle"), dict) else {}
    present = [k for k in MASK_TOKEN_KEYS if k in cfg]
    parallel = bool(spec.get("parallel", True)) if spec else bool(present)
    if parallel:
        ids = {cfg.get(k) for k in MASK_TOKEN_KEYS}
        vocab = cfg.get("vocab_size") if type(cfg.get("vocab_size")) is int else None
        if len(present) < 3 or len(ids) != 1 or not (type(cfg.get("mask_token_id")) is int
                                                     and (vocab is None or 0 <= cfg["mask_token_id"] < vocab)):
            problems.append(f"a parallel (P-EAGLE) drafter needs one in-vocabulary mask token id under all of "
                            f"{list(MASK_TOKEN_KEYS)}, found {({k: cfg[k] for k in present})}")
    elif present:
        problems.append(f"an EAGLE-3 drafter must not carry {present}: they mark a parallel drafter")
    variant = spec.get("hidden_variant", "shared")
    if variant != "shared":
        problems.append(f"hidden_variant is {variant!r}: vLLM drafts with the shared mask_hidden alone; this Table 3 "
                        "ablation drafter runs in the suite's engine only")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))

    path = directory / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {}
            for name in f.keys():
                sl = f.get_slice(name)
                found[name.replace("midlayer.", "layers.0.", 1) if name.startswith("midlayer.") else name] = (
                    tuple(sl.get_shape()), sl.get_dtype())
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    expected = _expected_shapes(cfg, parallel)
    optional = {"t2d": (cfg["vocab_size"],)}
    (expected if cfg["draft_vocab_size"] < cfg["vocab_size"] else optional)["d2t"] = (cfg["draft_vocab_size"],)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - set(optional))
    if "mask_hidden" in unexpected:
        problems.append("has mask_hidden, which makes vLLM treat it as a P-EAGLE drafter, but the config "
                        "says EAGLE-3")
        unexpected.remove("mask_hidden")
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for name, (shape, dtype) in sorted(found.items()):
        want = expected.get(name, optional.get(name))
        if want is not None and shape != want:
            problems.append(f"{name} has shape {list(shape)}, config implies {list(want)}")
        if name not in ("d2t", "t2d") and dtype not in ("F16", "BF16", "F32", "F64"):
            problems.append(f"{name} has dtype {dtype}, expected a floating type")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    verify_weights(directory, cfg)


def load_trainer_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_NAME, weights_only=False)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete training checkpoints under ``root`` (``step_XXXXXXX`` dirs), oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")]
    dirs = [p for p in dirs if (p / STATE_NAME).exists() and (p / WEIGHTS_NAME).exists()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))
