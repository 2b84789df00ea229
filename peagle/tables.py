"""Paper tables assembled from the pipeline's own result files, with provenance sidecars."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from peagle.config import Config
from peagle.io import atomic_write_json, atomic_write_text

PAPER_NUMBERS = Path(__file__).parent / "resources" / "paper_numbers.csv"


class TableError(ValueError):
    """A result file the table needs is missing or inconsistent."""


def git_commit(repo: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo or Path.cwd(), capture_output=True,
                             text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo or Path.cwd(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def read_benchmark(path: str | Path) -> dict[str, float]:
    """A Snakemake ``benchmark:`` TSV -> its first row (``s`` is wall seconds, ``max_rss`` MiB)."""
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise TableError(f"{path}: empty benchmark file")
    out = {}
    for k, v in rows[0].items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def paper_numbers() -> pd.DataFrame:
    """The paper's recorded numbers (see peagle/resources/README.md for the source)."""
    return pd.read_csv(PAPER_NUMBERS, dtype=str)


def _load_eval(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise TableError(f"{path}: evaluation result missing; run the evaluate rule") from None
    except json.JSONDecodeError as err:
        raise TableError(f"{path}: not valid JSON ({err}); delete it and re-run the evaluate rule") from None


def write_table1(cfg: Config, evals: list[str], benchmarks: list[str], out: str | Path,
                 config_files: list[str] | None = None, target_json: str | Path | None = None) -> pd.DataFrame:
    """Table 1: acceptance length (rows: methods, columns: training context lengths actually used).

    ``evals`` are the evaluate rule's JSON files; ``benchmarks`` the Snakemake benchmark files of
    the rules that produced them (their wall times go to the provenance sidecar).
    """
    t1 = cfg.table1
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for path in evals:
        res = _load_eval(path)
        key = (res["method"], int(res["ctx"]))
        if res["eval_set"] != t1.eval_set or res["k"] != t1.k:
            raise TableError(f"{path}: evaluated on {res['eval_set']} at K={res['k']}, but table1 wants "
                             f"{t1.eval_set} at K={t1.k} (config table1.eval_set / table1.k)")
        if key in cells:
            raise TableError(f"{path}: a second result for method {key[0]} at ctx {key[1]}")
        cells[key] = {**res, "file": str(path)}
    rows = []
    for method in t1.methods:
        row: dict[str, Any] = {"method": method}
        layers = None
        for ctx in t1.contexts:
            cell = cells.get((method, ctx))
            if cell is None:
                raise TableError(f"no evaluation result for method {method} at ctx {ctx} among {len(evals)} files")
            row[f"ctx={ctx}"] = round(float(cell["acceptance_length"]), 3)
            layers = cell.get("drafter_layers", layers)
        row = {"method": method, "layers": layers, **{k: v for k, v in row.items() if k != "method"}}
        rows.append(row)
    df = pd.DataFrame(rows)
    out = Path(out)
    atomic_write_text(out, df.to_csv(index=False))
    provenance = {
        "table": "table1",
        "profile": cfg.profile,
        "what": f"acceptance length on {t1.eval_set} at K={t1.k} vs training context length",
        "paper_contexts": dict(zip((f"ctx={c}" for c in t1.contexts), t1.paper_contexts)),
        "commit": git_commit(),
        "config_files": config_files,
        "config": cfg.to_dict(),
        "seeds": {"global": cfg.seed, "train": cfg.train.seed},
        "cells": {f"{m}@ctx={c}": {k: v for k, v in cell.items() if k in (
            "file", "acceptance_length", "per_position_acceptance", "prompts", "rounds", "new_tokens",
            "wall_s", "lossless_checks", "drafter")} for (m, c), cell in sorted(cells.items())},
        "wall_times_s": {str(b): read_benchmark(b).get("s") for b in benchmarks},
    }
    provenance["wall_time_total_s"] = sum(v for v in provenance["wall_times_s"].values() if v is not None)
    if target_json is not None:
        info = json.loads(Path(target_json).read_text())
        provenance["target"] = {k: info.get(k) for k in (
            "path", "kind", "name", "architecture", "num_layers", "hidden_size", "vocab_size", "aux_layer_ids",
            "heldout_next_token_accuracy")}
    atomic_write_json(out.with_suffix(".provenance.json"), provenance)
    return df
