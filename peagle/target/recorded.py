"""Recorded tiny targets: a pretrained target stored once, checksummed, and reused by later runs.

Pretraining a tiny target long enough to write like its data takes longer than the default
profile's time budget allows per run, so the pipeline's own ``target`` stage records its output
(``peagle target --record``) under ``target.recorded_dir/<name>/``, and a later run with the same
key reuses it instead of pretraining. The key is everything the weights depend on: the
pretraining code's version (``RECIPE_VERSION``), the target's architecture and pretraining
settings, the profile seed and the SHA-256 of the data files it was trained and evaluated on. A
different key pretrains afresh (and says why); a file whose checksum
differs from the record is an error, never silently reused.

Layout of a record: the target stage's own outputs (``target.json``, ``model/``,
``pretrain_metrics.json``, ``pretrain_log.jsonl``) plus ``record.json``: key, per-file SHA-256,
the commit and command that built it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from peagle.io import atomic_dir, atomic_path, atomic_write_json, sha256_file

__all__ = ["RecordError", "record_key", "record_target", "reuse_recorded"]

RECORD_FORMAT = "peagle-recorded-target-v1"
RECORD_JSON = "record.json"
REBUILD = "make record-targets"


class RecordError(ValueError):
    """A recorded target is damaged (a file is missing or its checksum differs)."""


def record_key(target_cfg: Any, seed: int, data_manifest: dict[str, Any]) -> dict[str, Any]:
    """What a tiny target's weights depend on: the pretraining code's version, its config
    (architecture and ``pretrain``; not where it is recorded), the seed and the data files'
    SHA-256 from the data manifest."""
    from peagle.target.pretrain import RECIPE_VERSION

    tc = {k: v for k, v in asdict(target_cfg).items() if k != "recorded_dir"}
    files = {name: entry["sha256"] for name, entry in sorted(data_manifest["files"].items())}
    return {"recipe": RECIPE_VERSION, "target": tc, "seed": int(seed), "data_files": files}


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != RECORD_JSON}


def record_target(target_dir: str | Path, dest: str | Path, key: dict[str, Any], *, commit: str | None,
                  command: str) -> dict[str, Any]:
    """Copy a target stage's output ``target_dir`` to ``dest`` (atomically) with its record."""
    src = Path(target_dir)
    with atomic_dir(dest) as tmp:
        for name in ("target.json", "model", "pretrain_metrics.json", "pretrain_log.jsonl"):
            if (src / name).is_dir():
                shutil.copytree(src / name, tmp / name)
            elif (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        record = {"format": RECORD_FORMAT, "key": key, "files": _files(tmp), "commit": commit, "command": command}
        atomic_write_json(tmp / RECORD_JSON, record)
    return record


def _diff(want: Any, got: Any, path: str = "") -> str | None:
    """The first differing field of two JSON-like values, as a dotted path."""
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            d = _diff(want.get(k), got.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    return None if want == got else f"{path} (recorded {got!r}, now {want!r})"


def reuse_recorded(record_dir: str | Path, out_dir: str | Path, key: dict[str, Any]) -> tuple[bool, str]:
    """Copy the record at ``record_dir`` into ``out_dir`` if its key equals ``key``.

    Returns ``(reused, why)``: why not (no record, which field differs) or where it came from.
    Raises :class:`RecordError` if the key matches but a file is missing or altered.
    """
    rd = Path(record_dir)
    meta_path = rd / RECORD_JSON
    if not meta_path.exists():
        return False, f"no recorded target at {rd}"
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != RECORD_FORMAT:
        return False, f"{meta_path}: format {meta.get('format')!r}, expected {RECORD_FORMAT!r}"
    d = _diff(key, meta.get("key", {}))
    if d:
        return False, f"{rd} was recorded for other settings: {d}"
    for name, want in meta["files"].items():
        p = rd / name
        if not p.exists() or sha256_file(p) != want:
            raise RecordError(f"{p}: {'missing' if not p.exists() else 'checksum differs from'} {meta_path}; "
                              f"restore it (git checkout -- {rd}) or rebuild the record with `{REBUILD}`")
    # File by file into out_dir, which also holds later stages' outputs (responses, hidden states);
    # target.json last, since the workflow takes it as the sign of a finished target.
    out = Path(out_dir)
    with atomic_dir(out / "model") as tmp:
        for name in meta["files"]:
            if name.startswith("model/"):
                (tmp / name[len("model/"):]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(rd / name, tmp / name[len("model/"):])
    for name in [n for n in meta["files"] if not n.startswith("model/") and n != "target.json"] + [RECORD_JSON, "target.json"]:
        with atomic_path(out / name) as tmp:
            shutil.copy2(rd / name, tmp)
    return True, f"reused {rd} (built at {meta.get('commit')})"
