"""Paper tables assembled from the pipeline's own result files, with provenance sidecars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from peagle.config import Config
from peagle.io import read_json
from peagle.provenance import read_benchmark, read_provenance, write_table

PAPER_NUMBERS = Path(__file__).parent / "resources" / "paper_numbers.csv"


class TableError(ValueError):
    """A result file the table needs is missing or inconsistent."""


# What a table's provenance keeps of each evaluation result (the per-cell measurements).
_CELL_KEYS = ("file", "status", "acceptance_length", "per_position_acceptance", "prompts", "rounds", "new_tokens",
              "draft_s", "verify_s", "wall_s", "lossless_checks", "drafter", "drafter_layers", "ctx", "target",
              "training")


def paper_numbers() -> pd.DataFrame:
    """The paper's recorded numbers (see peagle/resources/README.md for the source)."""
    return pd.read_csv(PAPER_NUMBERS, dtype=str)


def _load_eval(path: str | Path) -> dict[str, Any]:
    return read_json(path, TableError, "evaluation result missing", fix="re-run the evaluate rule")


def cell_value(res: dict[str, Any]) -> float | str:
    """A table cell: the acceptance length, or the status (OOM / infeasible) the training measured."""
    status = res.get("status", "ok")
    if status != "ok":
        return status
    return round(float(res["acceptance_length"]), 3)


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
            row[f"ctx={ctx}"] = cell_value(cell)
            layers = cell.get("drafter_layers") or (cell.get("training") or {}).get("drafter_layers") or layers
        row = {"method": method, "layers": layers, **{k: v for k, v in row.items() if k != "method"}}
        rows.append(row)
    df = pd.DataFrame(rows)
    details: dict[str, Any] = {
        "paper_contexts": dict(zip((f"ctx={c}" for c in t1.contexts), t1.paper_contexts)),
        "cells": {f"{m}@ctx={c}": {k: v for k, v in cell.items() if k in _CELL_KEYS}
                  for (m, c), cell in sorted(cells.items())},
        "budgets": {"memory_budget_mb": cfg.train.memory_budget_mb,
                    "time_budget_s_per_epoch": cfg.train.time_budget_s_per_epoch},
        "wall_times_s": {str(b): read_benchmark(b).get("s") for b in benchmarks},
    }
    details["wall_time_total_s"] = sum(v for v in details["wall_times_s"].values() if v is not None)
    if target_json is not None:
        info = json.loads(Path(target_json).read_text())
        details["target"] = {k: info.get(k) for k in (
            "path", "kind", "name", "architecture", "num_layers", "hidden_size", "vocab_size", "aux_layer_ids",
            "heldout_next_token_accuracy")}
    write_table(df, out, table="table1", cfg=cfg, config_files=config_files,
                what=f"acceptance length on {t1.eval_set} at K={t1.k} vs training context length", **details)
    return df


# --------------------------------------------------------------------------- Table 9

TABLE9_METHODS = ("eagle3", "peagle")
EVAL_SET_ORDER = ("mt_bench", "humaneval", "gsm8k")
TABLE9_COLUMNS = ["target", "architecture", "eval_set", "k", "eagle3_layers", "eagle3", "peagle_layers", "peagle",
                  "rel_diff_pct"]


def _target_name(res: dict[str, Any]) -> str:
    name = res.get("target_name") or res.get("target")
    if not name:
        raise TableError("result has neither 'target_name' nor 'target'")
    return str(name)


def _layers(cell: dict[str, Any]) -> int | None:
    """Drafter layers of a cell; a cell whose training failed has them in its training summary."""
    layers = cell.get("drafter_layers")
    if layers is None:
        layers = (cell.get("training") or {}).get("drafter_layers")
    return layers


def _cell_value(cell: dict[str, Any], path: str) -> float | str:
    """A cell's acceptance length rounded to 3 decimals, or its status string (``OOM``, ``infeasible``)."""
    status = cell.get("status") or "ok"
    if status != "ok":
        return str(status)
    al = cell.get("acceptance_length")
    try:
        al = float(al)
    except (TypeError, ValueError):
        raise TableError(f"{path}: status ok but acceptance_length is {al!r}") from None
    if al != al:  # NaN: no verification round at all
        raise TableError(f"{path}: acceptance_length is NaN (no decoding rounds); check the prompts file")
    return round(al, 3)


def write_table9(cfg: Config, evals: list[str], out: str | Path,
                 config_files: list[str] | None = None) -> pd.DataFrame:
    """Table 9: acceptance length of EAGLE-3 vs P-EAGLE per target and evaluation set.

    ``evals`` are evaluate-rule JSONs (keys ``method``, ``target_name`` (else ``target``),
    ``target_architecture``, ``eval_set``, ``k``, ``acceptance_length``, ``drafter_layers``,
    optionally ``status``). Targets are listed in config order (``table9.targets``, else the order
    they first appear in ``evals``); evaluation sets in the order mt_bench, humaneval, gsm8k.
    Every target x evaluation set needs one result per method, all at one K. Cells whose
    ``status`` is not ``ok`` show the status.
    """
    t9 = getattr(cfg, "table9", None)
    want_k = getattr(t9, "k", None)
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    targets: list[str] = []
    ks: dict[int, str] = {}
    for path in evals:
        res = _load_eval(path)
        for key in ("method", "eval_set", "k"):
            if key not in res:
                raise TableError(f"{path}: no '{key}' in the evaluation result")
        try:
            target = _target_name(res)
        except TableError as err:
            raise TableError(f"{path}: {err}") from None
        method, eval_set = str(res["method"]), str(res["eval_set"])
        if method not in TABLE9_METHODS:
            raise TableError(f"{path}: method {method!r}; table9 compares {' and '.join(TABLE9_METHODS)}")
        if eval_set not in EVAL_SET_ORDER:
            raise TableError(f"{path}: evaluation set {eval_set!r} is not one of {', '.join(EVAL_SET_ORDER)}")
        ks.setdefault(int(res["k"]), str(path))
        key = (target, eval_set, method)
        if key in cells:
            raise TableError(f"{path}: a second result for {method} on {target}/{eval_set} "
                             f"(the first is {cells[key]['file']})")
        cells[key] = {**res, "file": str(path)}
        if target not in targets:
            targets.append(target)
    if not cells:
        raise TableError("table9: no evaluation results given")
    if len(ks) > 1:
        raise TableError(f"table9: results at mixed K {sorted(ks)} (e.g. K={min(ks)} in {ks[min(ks)]}, "
                         f"K={max(ks)} in {ks[max(ks)]}); every cell must use one K")
    k = next(iter(ks))
    if want_k is not None and k != want_k:
        raise TableError(f"table9: results are at K={k} ({ks[k]}), but table9.k is {want_k}")
    found_sets = {s for (_, s, _) in cells}
    wanted_sets = [s for s in EVAL_SET_ORDER if s in (getattr(t9, "eval_sets", None) or found_sets)]
    extra = sorted(found_sets - set(wanted_sets))
    if extra:
        raise TableError(f"table9: results for evaluation sets {extra} that table9.eval_sets ({wanted_sets}) "
                         f"does not list")
    # Configured targets are required only when the results name their targets (``target_name``).
    wanted_targets = getattr(cfg, "table9_targets", None) if all("target_name" in c for c in cells.values()) else None
    if wanted_targets:
        absent = [t for t in wanted_targets if t not in targets]
        if absent:
            raise TableError(f"table9: no evaluation results for targets {absent} (table9.targets); "
                             f"got results for {targets}")
        unlisted = [t for t in targets if t not in wanted_targets]
        if unlisted:
            raise TableError(f"table9: results for targets {unlisted} that table9.targets ({wanted_targets}) "
                             f"does not list")
        targets = list(wanted_targets)
    missing = [f"{m} on {t}/{s}" for t in targets for s in wanted_sets for m in TABLE9_METHODS
               if (t, s, m) not in cells]
    if missing:
        raise TableError(f"table9: {len(missing)} cell(s) missing among {len(evals)} files: {', '.join(missing)}")
    rows = []
    for t in targets:
        for s in wanted_sets:
            e3, pe = cells[(t, s, "eagle3")], cells[(t, s, "peagle")]
            v3, vp = _cell_value(e3, e3["file"]), _cell_value(pe, pe["file"])
            rel = None
            if isinstance(v3, float) and isinstance(vp, float) and v3:  # from the unrounded ALs
                a3, ap = float(e3["acceptance_length"]), float(pe["acceptance_length"])
                rel = round(100.0 * (ap - a3) / a3, 1)
            arch = pe.get("target_architecture") or e3.get("target_architecture")
            rows.append({"target": t, "architecture": arch, "eval_set": s, "k": k,
                         "eagle3_layers": _layers(e3), "eagle3": v3,
                         "peagle_layers": _layers(pe), "peagle": vp, "rel_diff_pct": rel})
    df = pd.DataFrame(rows, columns=TABLE9_COLUMNS)
    for col in ("k", "eagle3_layers", "peagle_layers"):  # a missing layer count must not turn 4 into 4.0
        df[col] = df[col].astype("Int64")
    write_table(df, out, table="table9", cfg=cfg, config_files=config_files,
                what=f"acceptance length at K={k}, EAGLE-3 vs P-EAGLE, per target and evaluation set; "
                     f"rel_diff_pct = 100 (peagle - eagle3) / eagle3",
                cells={f"{t}/{s}/{m}": {k_: v for k_, v in cell.items() if k_ in _CELL_KEYS}
                       for (t, s, m), cell in sorted(cells.items())})
    return df


# --------------------------------------------------------------------------- Table 10

TABLE10_METHODS = ("eagle3", "peagle")


def table10_columns(ks: list[int]) -> list[str]:
    per_k = [c for k in ks for c in (f"peagle_k{k}_tok_s", f"peagle_k{k}_al", f"speedup_k{k}")]
    return (["target", "eval_set", "concurrency", "eagle3_k", "eagle3_tok_s", "eagle3_al"] + per_k
            + ["peagle_best_k", "speedup_best"])


def write_table10(cfg: Config, results: list[str], out: str | Path,
                  config_files: list[str] | None = None) -> pd.DataFrame:
    """Table 10: vLLM output tokens/s of P-EAGLE at each K vs EAGLE-3 at its best K, with speedups.

    ``results`` are ``vllm-throughput`` JSONs (one drafter x K x target x evaluation set, with
    ``concurrency``: [{"concurrency", "output_tokens_per_s", "acceptance_length", ...}]). One row per
    target x evaluation set x concurrency; EAGLE-3's K is the one with the most output tokens/s in
    that row (among the EAGLE-3 results given). ``speedup_kK`` = P-EAGLE at K / EAGLE-3 at its best
    K; ``speedup_best`` uses P-EAGLE's best K. P-EAGLE's Ks: ``table10.ks`` (default 3, 5, 7);
    concurrencies: ``vllm.concurrency`` (default 1, 2, 4). A cell whose drafter did not train
    (``status`` OOM/infeasible) shows the status and has no speedup. Every row needs every P-EAGLE
    K and at least one EAGLE-3 result, else :class:`TableError` lists what is missing.
    """
    t10 = getattr(cfg, "table10", None)
    ks = list(getattr(t10, "ks", None) or [3, 5, 7])
    wanted_c = list(getattr(getattr(cfg, "vllm", None), "concurrency", None) or [1, 2, 4])
    cells: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    targets: list[str] = []
    for path in results:
        res = _load_eval(path)
        for key in ("method", "eval_set", "k"):
            if res.get(key) is None and res.get("status", "ok") == "ok":
                raise TableError(f"{path}: no '{key}' in the throughput result (a no-speculation run?)")
        method, eval_set = str(res["method"]), str(res["eval_set"])
        if method not in TABLE10_METHODS:
            raise TableError(f"{path}: method {method!r}; table10 compares {' and '.join(TABLE10_METHODS)}")
        target = _target_name(res)
        key = (target, eval_set, method, int(res["k"]))
        if key in cells:
            raise TableError(f"{path}: a second result for {method} K={key[3]} on {target}/{eval_set} "
                             f"(the first is {cells[key]['file']})")
        levels = {int(lv["concurrency"]): lv for lv in res.get("concurrency") or []}
        if res.get("status", "ok") == "ok":
            absent = [c for c in wanted_c if c not in levels]
            if absent:
                raise TableError(f"{path}: no measurement at concurrency {absent} (vllm.concurrency)")
        cells[key] = {**res, "file": str(path), "levels": levels}
        if target not in targets:
            targets.append(target)
    if not cells:
        raise TableError("table10: no throughput results given")
    sets = [s for s in EVAL_SET_ORDER if any(k[1] == s for k in cells)]
    missing = []
    for t in targets:
        for s in sets:
            missing += [f"peagle K={k} on {t}/{s}" for k in ks if (t, s, "peagle", k) not in cells]
            if not any(k[:3] == (t, s, "eagle3") for k in cells):
                missing.append(f"eagle3 (any K) on {t}/{s}")
    if missing:
        raise TableError(f"table10: {len(missing)} cell(s) missing among {len(results)} files: {', '.join(missing)}")

    def measure(cell: dict[str, Any], c: int) -> tuple[float | str, float | None]:
        if cell.get("status", "ok") != "ok":
            return str(cell["status"]), None
        lv = cell["levels"][c]
        al = lv.get("acceptance_length")
        return float(lv["output_tokens_per_s"]), None if al is None else round(float(al), 3)

    rows = []
    for t in targets:
        for s in sets:
            e3 = sorted((k[3], cell) for k, cell in cells.items() if k[:3] == (t, s, "eagle3"))
            for c in wanted_c:
                row: dict[str, Any] = {"target": t, "eval_set": s, "concurrency": c}
                ok = [(tok, k, al) for k, cell in e3 for tok, al in [measure(cell, c)] if isinstance(tok, float)]
                if ok:
                    e_tok, e_k, e_al = max(ok, key=lambda x: x[0])
                    row.update(eagle3_k=e_k, eagle3_tok_s=round(e_tok, 2), eagle3_al=e_al)
                else:  # every EAGLE-3 drafter failed to train: show the status
                    row.update(eagle3_k=None, eagle3_tok_s=measure(e3[0][1], c)[0], eagle3_al=None)
                    e_tok = None
                best = None
                for k in ks:
                    tok, al = measure(cells[(t, s, "peagle", k)], c)
                    sp = round(tok / e_tok, 3) if isinstance(tok, float) and e_tok else None
                    row.update({f"peagle_k{k}_tok_s": round(tok, 2) if isinstance(tok, float) else tok,
                                f"peagle_k{k}_al": al, f"speedup_k{k}": sp})
                    if isinstance(tok, float) and (best is None or tok > best[0]):
                        best = (tok, k)
                row["peagle_best_k"] = best[1] if best else None
                row["speedup_best"] = round(best[0] / e_tok, 3) if best and e_tok else None
                rows.append(row)
    df = pd.DataFrame(rows, columns=table10_columns(ks))
    for col in ("concurrency", "eagle3_k", "peagle_best_k"):
        df[col] = df[col].astype("Int64")
    keep = ("file", "status", "drafter", "k", "k_train", "method", "ctx", "prompts", "output_len", "speculative_config",
            "server_startup_s", "concurrency", "settings", "device", "vllm_version", "target")
    write_table(df, out, table="table10", cfg=cfg, config_files=config_files,
                what="vLLM serving benchmark: output tokens/s (and acceptance length from vLLM's counters) of "
                     f"P-EAGLE at K in {ks} vs EAGLE-3 at its best K per row; speedup = P-EAGLE / EAGLE-3 tok/s",
                cells={f"{t}/{s}/{m}/k{k}": {k_: v for k_, v in cell.items() if k_ in keep}
                       for (t, s, m, k), cell in sorted(cells.items())})
    return df


# --------------------------------------------------------------------------- merging CSVs


def concat_csv(inputs: list[str | Path], out: str | Path, table: str | None = None) -> pd.DataFrame:
    """Stack CSVs with the same columns (e.g. one drafting-cost CSV per target) into ``out``.

    The inputs' provenance sidecars are kept under ``parts``, keyed by input path; the profile,
    config digest and config they agree on are lifted to the top, so ``out`` reads like any table.
    """
    if not inputs:
        raise TableError("concat-csv: no input files")
    frames, columns = [], None
    for path in inputs:
        try:
            df = pd.read_csv(path)
        except FileNotFoundError:
            raise TableError(f"{path}: not found") from None
        except pd.errors.EmptyDataError:
            raise TableError(f"{path}: empty CSV") from None
        if columns is None:
            columns = list(df.columns)
        elif list(df.columns) != columns:
            raise TableError(f"{path}: columns {list(df.columns)} differ from {inputs[0]}'s {columns}")
        frames.append(df)
    merged = pd.concat(frames, ignore_index=True)
    sidecars = [read_provenance(p) for p in inputs]
    parts = {str(p): prov for p, prov in zip(inputs, sidecars) if prov is not None}
    shared = {}
    for key in ("profile", "config_digest", "config_files", "config", "seeds"):
        values = [json.dumps((prov or {}).get(key), sort_keys=True) for prov in sidecars]
        if len(set(values)) == 1 and values[0] != "null":
            shared[key] = json.loads(values[0])
    write_table(merged, out, table=table or Path(out).stem, what="concatenation of the inputs' rows, in order",
                config_files=shared.pop("config_files", None), inputs=[str(p) for p in inputs], parts=parts,
                **shared)
    return merged
