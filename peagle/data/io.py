"""The data stage's output directory: writing it (with a manifest) and validating it.

Layout (ARCHITECTURE.md): ``train.jsonl``, ``eval_mt_bench.jsonl``, ``eval_humaneval.jsonl``,
``eval_gsm8k.jsonl`` and ``manifest.json`` (per-file record counts and sha256, generator
parameters). The manifest is written last, so its presence means the directory is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from peagle.data.schema import EVAL_ROLES, PromptRecord, SchemaError, read_prompts, write_prompts
from peagle.io import atomic_write_json, sha256_file

__all__ = ["DATA_FILES", "MANIFEST_NAME", "DataDirError", "write_data_dir", "validate_data_dir"]

# role -> file name; the eval roles are the evaluation sets the files mirror.
DATA_FILES: dict[str, str] = {
    "train": "train.jsonl",
    "mt_bench": "eval_mt_bench.jsonl",
    "humaneval": "eval_humaneval.jsonl",
    "gsm8k": "eval_gsm8k.jsonl",
}
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class DataDirError(ValueError):
    """A data directory is missing files, has inconsistent files, or leaks eval prompts into train."""


def _check_split(
    train: Sequence[PromptRecord], evals: Mapping[str, Sequence[PromptRecord]], where: str
) -> None:
    for rec in train:
        if rec.role != "train":
            raise DataDirError(f"{where}{DATA_FILES['train']}: record {rec.id!r} field 'role' is {rec.role!r}, expected 'train'")
    eval_prompt_owner: dict[str, str] = {}
    for role in EVAL_ROLES:
        recs = evals.get(role)
        if not recs:
            raise DataDirError(f"{where}{DATA_FILES[role]}: no records (every eval set needs at least one prompt)")
        for rec in recs:
            if rec.role != role:
                raise DataDirError(
                    f"{where}{DATA_FILES[role]}: record {rec.id!r} field 'role' is {rec.role!r}, expected {role!r}"
                )
            eval_prompt_owner.setdefault(rec.turns[0], rec.id)
    extra = sorted(set(evals) - set(EVAL_ROLES))
    if extra:
        raise DataDirError(f"{where}unknown eval role(s) {extra}; expected {', '.join(EVAL_ROLES)}")
    if not train:
        raise DataDirError(f"{where}{DATA_FILES['train']}: no training records")
    for rec in train:
        if rec.turns[0] in eval_prompt_owner:
            raise DataDirError(
                f"{where}train record {rec.id!r} has the same prompt as eval record "
                f"{eval_prompt_owner[rec.turns[0]]!r} (train/eval leak); regenerate the data"
            )


def write_data_dir(
    out_dir: str | os.PathLike[str],
    train: Sequence[PromptRecord],
    evals: Mapping[str, Sequence[PromptRecord]],
    *,
    params: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the four prompt files and ``manifest.json`` atomically; return the manifest.

    Refuses (``DataDirError``) wrong roles, empty sets, and train prompts equal to eval prompts.
    The manifest holds no timestamps or absolute paths so equal inputs give byte-identical output.
    """
    out = Path(out_dir)
    _check_split(train, evals, f"{out}/")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    for role, fname in DATA_FILES.items():
        recs = list(train) if role == "train" else list(evals[role])
        digest = write_prompts(out / fname, recs)
        files[fname] = {"role": role, "records": len(recs), "sha256": digest}
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "params": dict(params),
        "files": files,
        **(dict(extra) if extra else {}),
    }
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def validate_data_dir(
    data_dir: str | os.PathLike[str], *, require_manifest: bool = False
) -> dict[str, list[PromptRecord]]:
    """Check a data directory and return its records keyed by role (``train``, ``mt_bench``, ...).

    All four files must exist and parse strictly, each file must hold only its role, eval sets must
    be non-empty, and no training prompt may equal an eval prompt. If ``manifest.json`` exists (it
    must when ``require_manifest``), each file's sha256 and record count must match it.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise DataDirError(f"{d}: data directory not found (run `python -m peagle data --config C --out-dir {d}`)")
    missing = [f for f in DATA_FILES.values() if not (d / f).is_file()]
    if missing:
        raise DataDirError(
            f"{d}: missing {', '.join(missing)} (the data stage did not finish; rerun `python -m peagle data`)"
        )
    out: dict[str, list[PromptRecord]] = {}
    for role, fname in DATA_FILES.items():
        try:
            out[role] = read_prompts(d / fname, expect_role=role)
        except SchemaError as exc:
            raise DataDirError(str(exc)) from None
    _check_split(out["train"], {r: out[r] for r in EVAL_ROLES}, f"{d}/")

    mpath = d / MANIFEST_NAME
    if not mpath.is_file():
        if require_manifest:
            raise DataDirError(f"{mpath}: missing (the data stage writes it last; rerun `python -m peagle data`)")
        return out
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataDirError(f"{mpath}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise DataDirError(f"{mpath}: field 'files' missing or not an object")
    for role, fname in DATA_FILES.items():
        entry = files.get(fname)
        if not isinstance(entry, dict) or "sha256" not in entry or "records" not in entry:
            raise DataDirError(f"{mpath}: field 'files.{fname}' missing or lacks 'sha256'/'records'")
        actual = sha256_file(d / fname)
        if actual != entry["sha256"]:
            raise DataDirError(
                f"{d / fname}: sha256 {actual[:12]}... differs from manifest's {str(entry['sha256'])[:12]}... "
                f"(file changed after the data stage; rerun `python -m peagle data`)"
            )
        if entry["records"] != len(out[role]):
            raise DataDirError(f"{mpath}: field 'files.{fname}.records' is {entry['records']}, file has {len(out[role])}")
    return out
