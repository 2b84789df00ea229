"""Recorded baselines: a finished run's tables, kept where the DAG never writes.

``peagle record`` copies a run's tables, sidecars and figures into ``results/recorded/<profile>/``
(committed), regenerates the comparison there, and writes ``manifest.json``: the profile, commit
and config digest of the run, the machine, the wall time of each stage (from the Snakemake
benchmark files) and a checksum and provenance summary of every recorded file. Files already in
the recorded directory that this run did not make (a table of a rule outside ``all``, such as
Table 2) are kept and listed with their own commit and digest, so ``peagle compare`` can say
which of them are stale.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from peagle.config import Config
from peagle.io import atomic_path, atomic_write_json, atomic_write_text, sha256_file
from peagle.provenance import ProvenanceError, git_commit, machine, now, read_benchmark, read_provenance

RECORDED_ROOT = Path("results/recorded")
# What a tables directory holds that is worth recording (paths relative to it).
PATTERNS = ("*.csv", "*.provenance.json", "figures/*.png", "figures/*.pdf", "figures/*.csv")
MANIFEST = "manifest.json"
COMPARISON = "comparison.md"


class RecordError(ValueError):
    """The run to record is incomplete or inconsistent."""


def recorded_dir(profile: str) -> Path:
    return RECORDED_ROOT / profile


def stage_wall_times(benchmarks_dir: str | Path) -> dict[str, dict[str, float]]:
    """Per stage (the first path component under ``benchmarks_dir``): jobs, summed and max seconds."""
    root = Path(benchmarks_dir)
    stages: dict[str, dict[str, float]] = defaultdict(lambda: {"jobs": 0, "s": 0.0, "max_s": 0.0})
    for path in sorted(root.rglob("*.tsv")):
        rel = path.relative_to(root)
        stage = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        s = read_benchmark(path).get("s") or 0.0
        st = stages[stage]
        st["jobs"] += 1
        st["s"] = round(st["s"] + s, 2)
        st["max_s"] = round(max(st["max_s"], s), 2)
    return dict(stages)


def _copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _file_entry(path: Path, table_of: Path | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"sha256": sha256_file(path)}
    if table_of is not None:
        try:
            prov = read_provenance(table_of)
        except ProvenanceError:
            prov = None
        if prov is not None:
            entry.update({k: prov.get(k) for k in ("commit", "config_digest", "created")})
    return entry


def record_run(cfg: Config, tables_dir: str | Path, benchmarks_dir: str | Path, out_dir: str | Path,
               config_files: list[str], wall_s: float | None = None) -> dict[str, Any]:
    """Copy ``tables_dir``'s tables into ``out_dir`` and write its manifest; returns the manifest.

    Refuses a run whose tables were made with settings other than ``cfg``'s (their config digest
    differs): a recorded baseline must say truthfully which config made it.
    """
    from peagle.compare import compare_tables

    tables_dir, out_dir = Path(tables_dir), Path(out_dir)
    digest = cfg.digest()
    found = sorted({p for pattern in PATTERNS for p in tables_dir.glob(pattern)})
    tables = [p for p in found if p.suffix == ".csv" and p.parent == tables_dir]
    if not tables:
        raise RecordError(f"{tables_dir}: no tables to record; run `snakemake --cores all` first")
    for table in tables:
        prov = read_provenance(table)
        if prov is None:
            raise RecordError(f"{table}: no provenance sidecar; re-run the rule that writes it")
        if prov.get("config_digest") != digest:
            raise RecordError(f"{table}: made with config digest {prov.get('config_digest')}, but "
                              f"{', '.join(config_files)} digest to {digest}; re-run the DAG with this config "
                              "or record with the config that made it")
    for src in found:
        _copy(src, out_dir / src.relative_to(tables_dir))
    stages = stage_wall_times(benchmarks_dir) if Path(benchmarks_dir).exists() else {}
    manifest = {
        "profile": cfg.profile,
        "commit": git_commit(),
        "config_digest": digest,
        "config_files": list(config_files),
        "recorded_at": now(),
        "machine": machine(import_torch=True),
        "wall_time_s": wall_s,
        "stage_times_s": stages,
        "stage_time_total_s": round(sum(st["s"] for st in stages.values()), 1),
        "source": {"tables_dir": str(tables_dir), "benchmarks_dir": str(benchmarks_dir)},
        "current_tables": sorted(p.name for p in tables),
    }
    atomic_write_json(out_dir / MANIFEST, manifest)  # the comparison's header reads it
    atomic_write_text(out_dir / COMPARISON, compare_tables(out_dir, current_digest=digest))
    manifest["files"] = {
        str(path.relative_to(out_dir)): _file_entry(path, path if path.suffix == ".csv" and path.parent == out_dir
                                                    else None)
        for path in sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != MANIFEST)}
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest
