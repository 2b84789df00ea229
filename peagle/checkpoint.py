"""Drafter checkpoints in the plain Hugging Face layout vLLM loads (DESIGN §7).

A checkpoint directory holds ``config.json`` (vLLM's ``LlamaForCausalLMEagle3`` keys plus a
``peagle`` block with what this suite needs to rebuild and audit the drafter) and
``model.safetensors`` with vLLM's parameter names (no ``model.`` prefix). Training checkpoints
add ``trainer_state.pt``. Directories are written under a temporary name and renamed into place,
so a killed run never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from peagle.drafters import DrafterSpec, PEagleDrafter
from peagle.io import atomic_dir

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
STATE_NAME = "trainer_state.pt"


class CheckpointError(ValueError):
    """A drafter checkpoint is missing, incomplete or inconsistent."""


def vllm_config(spec: DrafterSpec, meta: dict[str, Any]) -> dict[str, Any]:
    """config.json for vLLM's EAGLE-3 loader; the mask token is written under every key vLLM reads."""
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
        "mask_token_id": spec.mask_token_id,
        "pard_token": spec.mask_token_id,
        "ptd_token_id": spec.mask_token_id,
        "torch_dtype": "float32",
        "peagle": {"spec": spec.to_dict(), **meta},
    }


def save_drafter(directory: str | Path, model: PEagleDrafter, meta: dict[str, Any],
                 trainer_state: dict[str, Any] | None = None) -> Path:
    """Write config.json + model.safetensors (+ trainer_state.pt) atomically into ``directory``."""
    final = Path(directory)
    with atomic_dir(final) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(vllm_config(model.spec, meta), indent=2) + "\n")
        if trainer_state is not None:
            torch.save(trainer_state, tmp / STATE_NAME)
    return final


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no drafter config (is {directory} a drafter checkpoint directory?)") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if "peagle" not in cfg or "spec" not in cfg["peagle"]:
        raise CheckpointError(f"{path}: missing the 'peagle.spec' block written by peagle's save_drafter")
    return cfg


def load_drafter(directory: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[PEagleDrafter, dict[str, Any]]:
    """Rebuild a drafter from a checkpoint directory; returns (model, config.json contents)."""
    directory = Path(directory)
    cfg = read_config(directory)
    spec = DrafterSpec(**cfg["peagle"]["spec"])
    model = PEagleDrafter(spec)
    path = directory / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"{path}: weights file missing")
    state = load_file(str(path))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval(), cfg


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
