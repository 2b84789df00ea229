"""One writer for every table the suite produces: the CSV and its provenance sidecar.

A table ``T.csv`` always has ``T.provenance.json`` beside it, written by :func:`write_table` with
the same base fields whichever stage made it: what the table is, the commit, the profile, the
config digest and the validated config in effect, the seeds, the machine and the time. A stage
adds its own details (cells, measurements, wall times). ``peagle compare`` and ``peagle record``
read the base fields to say which run made a table and whether it still describes the profile.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peagle.io import atomic_write_json, atomic_write_text, read_json

if TYPE_CHECKING:
    import pandas as pd

    from peagle.config import Config

SIDECAR_SUFFIX = ".provenance.json"


class ProvenanceError(ValueError):
    """A benchmark or provenance file is missing or malformed."""


def sidecar(table: str | Path) -> Path:
    """``dir/T.csv`` -> ``dir/T.provenance.json``."""
    return Path(table).with_suffix(SIDECAR_SUFFIX)


def git_commit(repo: str | Path | None = None) -> str | None:
    """HEAD of the checkout (``-dirty`` when tracked files differ from it), or None outside git."""
    where = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "")


def machine(import_torch: bool = False) -> dict[str, Any]:
    """The host a table was measured on: CPU, memory, accelerator and library versions.

    torch is described when the process has imported it (or ``import_torch``): never imported
    just for this by a stage that does not need it.
    """
    info: dict[str, Any] = {"system": platform.system(), "machine": platform.machine(),
                            "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if import_torch:
        import torch  # noqa: F401
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    return info


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def base_provenance(table: str, what: str, cfg: Config | None = None,
                    config_files: list[str] | None = None) -> dict[str, Any]:
    """The fields every sidecar has; ``cfg`` adds the profile, its digest, the config and the seeds.

    ``seeds``: ``global`` (data, tiny target) and ``train`` (every training seed of the profile,
    ``train.seeds``; a table made from one drafter per cell says which one it used).
    """
    prov: dict[str, Any] = {"table": table, "what": what, "commit": git_commit(), "created": now(),
                            "machine": machine()}
    if cfg is not None:
        prov.update(profile=cfg.profile, config_digest=cfg.digest(), config_files=config_files,
                    config=cfg.to_dict(), seeds={"global": cfg.seed, "train": list(cfg.train.seeds)})
    elif config_files is not None:
        prov["config_files"] = config_files
    return prov


def write_table(df: pd.DataFrame, out: str | Path, *, table: str, what: str, cfg: Config | None = None,
                config_files: list[str] | None = None, **details: Any) -> dict[str, Any]:
    """Write ``df`` to ``out`` (CSV) and its sidecar, both atomically; returns the provenance.

    ``details`` are the stage's own fields (cells, settings, measurements); they may not replace a
    base field.
    """
    prov = base_provenance(table, what, cfg, config_files)
    clash = sorted(set(details) & set(prov))
    if clash:
        raise ValueError(f"write_table({table}): details may not replace the base fields {clash}")
    prov.update(details)
    out = Path(out)
    atomic_write_text(out, df.to_csv(index=False))
    atomic_write_json(sidecar(out), prov)
    return prov


def read_provenance(table: str | Path) -> dict[str, Any] | None:
    """The sidecar of ``table`` (a CSV or other output), or None when it has none."""
    path = sidecar(table)
    if not path.exists():
        return None
    prov = read_json(path, ProvenanceError, fix="re-run the rule that writes the table")
    if not isinstance(prov, dict):
        raise ProvenanceError(f"{path}: expected a JSON object")
    return prov


def read_benchmark(path: str | Path) -> dict[str, float]:
    """A Snakemake ``benchmark:`` TSV -> its first row (``s`` is wall seconds, ``max_rss`` MiB)."""
    try:
        with open(path) as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
        raise ProvenanceError(f"{path}: benchmark file missing; re-run the rule that writes it") from None
    if not rows:
        raise ProvenanceError(f"{path}: empty benchmark file")
    out = {}
    for k, v in rows[0].items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out
