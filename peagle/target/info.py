"""``target.json`` (ARCHITECTURE.md "Target") and the aux layer ids it records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from peagle.io import atomic_write_json

TARGET_JSON_FORMAT = "peagle-target-v1"


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """Three distinct aux layer ids (``hidden_states[i]`` = input to layer i) for an L-layer target.

    vLLM's EAGLE-3 default is ``[2, L//2, L-3]``; it is used when its ids are distinct and lie in
    ``[0, L)`` (L >= 7). Otherwise (shallow targets, where the default collapses, e.g. L=4 gives
    [2, 2, 1]) the fallback spreads over ``1..L-1``: ``[1, L//2, L-1]`` (L >= 4; L=4 -> [1, 2, 3]),
    and ``[0, 1, 2]`` for L=3. Fewer than 3 layers is an error. A config value always overrides.
    """
    L = int(num_layers)
    if L < 3:
        raise ValueError(f"a target with {L} layers cannot provide three distinct aux layer ids; "
                         f"use >= 3 layers")
    ids = [2, L // 2, L - 3]
    if len(set(ids)) == 3 and all(0 <= i < L for i in ids) and ids == sorted(ids):
        return ids
    if L >= 4:
        return [1, L // 2, L - 1]
    return [0, 1, 2]


def validate_aux_layer_ids(ids: Sequence[int], num_layers: int, where: str = "aux_layer_ids") -> list[int]:
    """Check three distinct ints in ``[0, L)`` and return them ascending.

    Ascending because vLLM collects aux states while walking the layers, so its concatenation
    order is layer order whatever order the config lists them in.
    """
    ids = [int(i) for i in ids]
    if len(ids) != 3 or len(set(ids)) != 3:
        raise ValueError(f"{where}: need three distinct layer ids, got {ids} (vLLM dedups repeated ids)")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"{where}: ids {bad} outside [0, {num_layers}) for a {num_layers}-layer "
                         f"target (id i = input to layer i; id L would need a hook)")
    return sorted(ids)


def write_target_json(out_path: str | Path, *, path: str, kind: str, num_layers: int,
                      hidden_size: int, vocab_size: int, aux_layer_ids: Sequence[int] | None,
                      mask_token_id: int | None, eos_token_id: int | Sequence[int] | None,
                      heldout_next_token_accuracy: float | None = None,
                      **extra: Any) -> dict[str, Any]:
    """Write ``target.json`` (ARCHITECTURE.md "Target") atomically and return its contents.

    ``path`` is an HF id or a local dir; a local dir inside ``out_path``'s directory is stored
    relative to it so the results tree can be moved. ``aux_layer_ids=None`` takes the default.
    Extra keyword fields (architecture, head counts, pretrain metrics, ...) are stored as given.
    """
    if kind not in ("tiny", "hf"):
        raise ValueError(f"target.json: kind={kind!r}; use 'tiny' or 'hf'")
    out_path = Path(out_path)
    aux = validate_aux_layer_ids(aux_layer_ids if aux_layer_ids is not None
                                 else default_aux_layer_ids(num_layers), num_layers,
                                 "target.aux_layer_ids")
    if mask_token_id is not None and not 0 <= int(mask_token_id) < int(vocab_size):
        raise ValueError(f"target.json: mask_token_id={mask_token_id} outside vocabulary [0, {vocab_size})")
    stored_path = str(path)
    p = Path(path)
    if p.exists():
        try:
            stored_path = os.path.relpath(p.resolve(), out_path.parent.resolve())
            if stored_path.startswith(".."):
                stored_path = str(p.resolve())
        except ValueError:  # different drive (Windows)
            stored_path = str(p.resolve())
    info: dict[str, Any] = {
        "format": TARGET_JSON_FORMAT, "path": stored_path, "kind": kind,
        "num_layers": int(num_layers), "hidden_size": int(hidden_size), "vocab_size": int(vocab_size),
        "aux_layer_ids": aux, "mask_token_id": None if mask_token_id is None else int(mask_token_id),
        "eos_token_id": eos_token_id, "heldout_next_token_accuracy": heldout_next_token_accuracy,
    }
    info.update(extra)
    atomic_write_json(out_path, info)
    return info


def read_target_json(target_json: str | Path) -> dict[str, Any]:
    target_json = Path(target_json)
    if not target_json.exists():
        raise FileNotFoundError(f"{target_json} not found; run the `target` stage first")
    try:
        info = json.loads(target_json.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{target_json}: not valid JSON ({e}); re-run the `target` stage") from e
    for key in ("path", "kind", "num_layers", "hidden_size", "vocab_size", "aux_layer_ids",
                "mask_token_id", "eos_token_id"):
        if key not in info:
            raise ValueError(f"{target_json}: missing field '{key}'; re-run the `target` stage")
    validate_aux_layer_ids(info["aux_layer_ids"], info["num_layers"], f"{target_json}: aux_layer_ids")
    return info


def resolve_model_path(target_json: str | Path, stored: str) -> str:
    """Stored ``path`` -> something ``from_pretrained`` accepts: a dir relative to the json's
    directory, else an existing path as given, else (unchanged) an HF hub id."""
    rel = Path(target_json).parent / stored
    if rel.exists():
        return str(rel)
    if Path(stored).exists():
        return stored
    return stored
