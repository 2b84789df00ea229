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
              "training", "seed")


def paper_numbers() -> pd.DataFrame:
    """The paper's recorded numbers (see peagle/resources/README.md for the source)."""
    return pd.read_csv(PAPER_NUMBERS, dtype=str)


def _load_eval(path: str | Path) -> dict[str, Any]:
    return read_json(path, TableError, "evaluation result missing", fix="re-run the evaluate rule")


# --------------------------------------------------------------------------- seeds per cell

# A training run whose memory peak lies within this fraction of its budget (either side) is flagged
# ``near_budget`` in Table 1: its ok/OOM outcome may flip with the machine, allocator or seed.
NEAR_BUDGET = 0.10


def _seeds(cfg: Any) -> list[int] | None:
    """``train.seeds`` of ``cfg`` (None for a config-like object without them)."""
    seeds = getattr(getattr(cfg, "train", None), "seeds", None)
    return list(seeds) if seeds else None


def seed_of(res: dict[str, Any], path: str, seeds: list[int] | None) -> int | None:
    """The training seed of an evaluation result: its ``seed``, else its training summary's.

    A result without one (made before seeds were recorded) counts as the only seed of a one-seed
    profile; with several seeds it is an error, as is a seed outside ``train.seeds``.
    """
    seed = res.get("seed")
    if seed is None:
        seed = (res.get("training") or {}).get("seed")
    if seed is None:
        if seeds is None or len(seeds) == 1:
            return seeds[0] if seeds else None
        raise TableError(f"{path}: the result names no training seed, but train.seeds has {len(seeds)} "
                         f"({seeds}); re-run the evaluate rule")
    seed = int(seed)
    if seeds is not None and seed not in seeds:
        raise TableError(f"{path}: a result of seed {seed}, which is not one of train.seeds {seeds}")
    return seed


def _run_value(res: dict[str, Any], path: str) -> float | str:
    """One run's unrounded acceptance length, or its status string (``OOM``, ``infeasible``)."""
    status = res.get("status") or "ok"
    if status != "ok":
        return str(status)
    al = res.get("acceptance_length")
    try:
        al = float(al)
    except (TypeError, ValueError):
        raise TableError(f"{path}: status ok but acceptance_length is {al!r}") from None
    if al != al:  # NaN: no verification round at all
        raise TableError(f"{path}: acceptance_length is NaN (no decoding rounds); check the prompts file")
    return al


def _margin(training: dict[str, Any]) -> float | None:
    """``budget_margin`` (peak / budget - 1) of a run's summary, computed when the summary lacks it."""
    margin = training.get("budget_margin")
    if margin is not None:
        return float(margin)
    peak, budget = training.get("peak_mem_mb"), training.get("budget_mb")
    if peak is None or not budget:
        return None
    return float(peak) / float(budget) - 1.0


def aggregate_seeds(runs: dict[int | None, dict[str, Any]], label: str) -> dict[str, Any]:
    """One cell over its seeds: ``runs`` maps seed -> evaluation result (with ``file``).

    ``value`` is the table cell: the mean acceptance length rounded to 3 decimals when every seed
    trained; the status when every seed ended the same way (``OOM``); ``"OOM (2/3 seeds)"`` when the
    seeds disagree (no mean then: ``ok_mean`` is that of the seeds that trained). ``std`` is the
    sample standard deviation (n - 1), None for one seed or a cell that is not all numbers. The
    memory fields come from the runs' training summaries: ``peak_mem_mb`` the largest peak,
    ``budget_margin`` the margin closest to the budget, ``near_budget`` whether any run's peak lies
    within ``NEAR_BUDGET`` of its budget.
    """
    import statistics

    values = {seed: _run_value(res, res["file"]) for seed, res in runs.items()}
    n = len(values)
    nums = [v for v in values.values() if isinstance(v, float)]
    failed = [v for v in values.values() if isinstance(v, str)]
    out: dict[str, Any] = {"n_seeds": n, "seeds": list(values),
                           "per_seed": {str(s): v for s, v in values.items()}, "mean": None, "std": None}
    if not failed:
        mean = statistics.fmean(nums)
        out.update(value=round(mean, 3), mean=mean, std=statistics.stdev(nums) if n >= 2 else None, agree=True)
    elif len(failed) == n and len(set(failed)) == 1:
        out.update(value=failed[0], agree=True)
    else:
        counts = {s: failed.count(s) for s in dict.fromkeys(failed)}
        out.update(value="; ".join(f"{s} ({c}/{n} seeds)" for s, c in counts.items()), agree=False,
                   ok_mean=statistics.fmean(nums) if nums else None)
    trainings = [res.get("training") or {} for res in runs.values()]
    peaks = [float(t["peak_mem_mb"]) for t in trainings if t.get("peak_mem_mb") is not None]
    budgets = sorted({t["budget_mb"] for t in trainings if t.get("budget_mb") is not None})
    if len(budgets) > 1:
        raise TableError(f"{label}: its seeds ran under different memory budgets {budgets} MiB; re-run the "
                         "train rule (train.memory_budget_mb)")
    margins = [m for t in trainings if (m := _margin(t)) is not None]
    closest = min(margins, key=abs) if margins else None
    out.update(peak_mem_mb=max(peaks) if peaks else None, budget_mb=budgets[0] if budgets else None,
               budget_margin=closest, near_budget=closest is not None and abs(closest) <= NEAR_BUDGET + 1e-12)
    return out


def _std_cell(agg: dict[str, Any]) -> float | None:
    return None if agg["std"] is None else round(agg["std"], 3)


def spread_note(seeds: list[int] | None, n_seeds: int) -> dict[str, Any]:
    """The provenance's ``seed_spread``: how many runs a cell is, and what that allows."""
    if n_seeds <= 1:
        return {"seeds": seeds, "n_seeds": n_seeds, "statistic": None,
                "note": f"1 seed, no spread: each cell is a single training run (train.seeds: {seeds}), the "
                        "_std columns are empty, and no difference is tested against seed noise. For a spread run "
                        "several seeds (--configfile config/tiny-seeds.yaml trains three per cell, the setting "
                        "for recorded baselines); the default run keeps one for time."}
    return {"seeds": seeds, "n_seeds": n_seeds,
            "statistic": "mean and sample standard deviation (n - 1) over the seeds' acceptance lengths",
            "note": "a cell whose seeds do not all train shows the failures with their count, e.g. "
                    "'OOM (2/3 seeds)', and has no mean or standard deviation; each seed's value: cells.*.per_seed"}


def _add_run(cells: dict[Any, dict[int | None, dict[str, Any]]], key: Any, res: dict[str, Any], path: str,
             seeds: list[int] | None, what: str) -> None:
    """File one evaluation result under its cell and seed; a second result for both is an error."""
    seed = seed_of(res, path, seeds)
    runs = cells.setdefault(key, {})
    if seed in runs:
        raise TableError(f"{path}: a second result for {what}, seed {seed} (the first is {runs[seed]['file']})")
    runs[seed] = {**res, "file": path}


def _group_by_seed(cells: dict[Any, dict[int | None, dict[str, Any]]], seeds: list[int] | None,
                   describe: Any) -> int:
    """Check that every cell has a result for each seed (``train.seeds``, else the seeds any cell
    has); returns the number of seeds per cell."""
    wanted = seeds if seeds is not None else list(dict.fromkeys(s for runs in cells.values() for s in runs))
    for key, runs in cells.items():
        missing = [s for s in wanted if s not in runs]
        if missing:
            raise TableError(f"no evaluation result of seed(s) {missing} for {describe(key)} (train.seeds "
                             f"{wanted}); got seeds {list(runs)}")
    return len(wanted)


def write_table1(cfg: Config, evals: list[str], benchmarks: list[str], out: str | Path,
                 config_files: list[str] | None = None, target_json: str | Path | None = None) -> pd.DataFrame:
    """Table 1: acceptance length (rows: methods, columns: training context lengths actually used).

    ``evals`` are the evaluate rule's JSON files, one per method x context x seed of
    ``train.seeds``; ``benchmarks`` the Snakemake benchmark files of the rules that produced them
    (their wall times go to the provenance sidecar). Columns: ``method``, ``layers``, ``n_seeds``;
    ``ctx=N`` the cell (mean over the seeds, or the status, see :func:`aggregate_seeds`);
    ``ctx=N_std`` its sample standard deviation (empty for one seed); ``ctx=N_peak_mem_mb`` the
    largest training memory peak of its seeds; ``budget_mb`` the row's memory budget; ``near_budget``
    the cells whose peak lies within 10% of the budget, with the margin (``ctx=640 (+4.0%)``).
    """
    t1 = cfg.table1
    seeds = _seeds(cfg)
    cells: dict[tuple[str, int], dict[int | None, dict[str, Any]]] = {}
    for path in evals:
        res = _load_eval(path)
        key = (res["method"], int(res["ctx"]))
        if res["eval_set"] != t1.eval_set or res["k"] != t1.k:
            raise TableError(f"{path}: evaluated on {res['eval_set']} at K={res['k']}, but table1 wants "
                             f"{t1.eval_set} at K={t1.k} (config table1.eval_set / table1.k)")
        _add_run(cells, key, res, str(path), seeds, f"method {key[0]} at ctx {key[1]}")
    for method in t1.methods:
        for ctx in t1.contexts:
            if (method, ctx) not in cells:
                raise TableError(f"no evaluation result for method {method} at ctx {ctx} among {len(evals)} files")
    n_seeds = _group_by_seed(cells, seeds, lambda k: f"method {k[0]} at ctx {k[1]}")
    # Runs in the order of train.seeds.
    order = seeds or list(dict.fromkeys(s for runs in cells.values() for s in runs))
    cells = {k: {s: runs[s] for s in order if s in runs} for k, runs in cells.items()}
    agg = {key: aggregate_seeds(runs, f"{key[0]}@ctx={key[1]}") for key, runs in cells.items()}
    rows = []
    for method in t1.methods:
        layers = None
        for ctx in t1.contexts:
            for cell in cells[(method, ctx)].values():
                layers = cell.get("drafter_layers") or (cell.get("training") or {}).get("drafter_layers") or layers
        row: dict[str, Any] = {"method": method, "layers": layers, "n_seeds": n_seeds}
        row.update({f"ctx={c}": agg[(method, c)]["value"] for c in t1.contexts})
        row.update({f"ctx={c}_std": _std_cell(agg[(method, c)]) for c in t1.contexts})
        row.update({f"ctx={c}_peak_mem_mb": None if agg[(method, c)]["peak_mem_mb"] is None
                    else round(agg[(method, c)]["peak_mem_mb"], 1) for c in t1.contexts})
        budgets = sorted({agg[(method, c)]["budget_mb"] for c in t1.contexts} - {None})
        if len(budgets) > 1:
            raise TableError(f"method {method}: its cells ran under different memory budgets {budgets} MiB; "
                             "re-run the train rule (train.memory_budget_mb)")
        row["budget_mb"] = budgets[0] if budgets else None
        row["near_budget"] = "; ".join(f"ctx={c} ({100 * agg[(method, c)]['budget_margin']:+.1f}%)"
                                       for c in t1.contexts if agg[(method, c)]["near_budget"])
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("layers", "n_seeds", "budget_mb"):  # a missing value must not turn 4 into 4.0
        df[col] = df[col].astype("Int64")
    details: dict[str, Any] = {
        "paper_contexts": dict(zip((f"ctx={c}" for c in t1.contexts), t1.paper_contexts)),
        "seed_spread": spread_note(seeds or order, n_seeds),
        "near_budget": {"threshold": NEAR_BUDGET,
                        "rule": "a cell is near its budget when some seed's training memory peak lies within "
                                f"+-{NEAR_BUDGET:.0%} of train.memory_budget_mb (budget_margin = peak / budget - 1, "
                                "from the run's summary.json); its OK/OOM outcome may flip on another machine"},
        "cells": {f"{m}@ctx={c}": {**agg[(m, c)],
                                   "runs": {str(s): {k: v for k, v in cell.items() if k in _CELL_KEYS}
                                            for s, cell in cells[(m, c)].items()}}
                  for (m, c) in sorted(cells)},
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
    spread = "mean over 1 seed (no spread)" if n_seeds == 1 else f"mean and std over {n_seeds} seeds"
    write_table(df, out, table="table1", cfg=cfg, config_files=config_files,
                what=f"acceptance length on {t1.eval_set} at K={t1.k} vs training context length ({spread}); "
                     "training memory peak and budget per cell", **details)
    return df


# --------------------------------------------------------------------------- Table 9

TABLE9_METHODS = ("eagle3", "peagle")
EVAL_SET_ORDER = ("mt_bench", "humaneval", "gsm8k")
TABLE9_COLUMNS = ["target", "architecture", "eval_set", "k", "n_seeds", "eagle3_layers", "eagle3", "eagle3_std",
                  "peagle_layers", "peagle", "peagle_std", "rel_diff_pct"]


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
    v = _run_value(cell, path)
    return round(v, 3) if isinstance(v, float) else v


def write_table9(cfg: Config, evals: list[str], out: str | Path,
                 config_files: list[str] | None = None) -> pd.DataFrame:
    """Table 9: acceptance length of EAGLE-3 vs P-EAGLE per target and evaluation set.

    ``evals`` are evaluate-rule JSONs (keys ``method``, ``target_name`` (else ``target``),
    ``target_architecture``, ``eval_set``, ``k``, ``acceptance_length``, ``drafter_layers``,
    optionally ``status`` and ``seed``), one per cell and seed of ``train.seeds``. Targets are listed
    in config order (``table9.targets``, else the order they first appear in ``evals``); evaluation
    sets in the order mt_bench, humaneval, gsm8k. Every target x evaluation set needs one result
    per method and seed, all at one K. ``eagle3`` / ``peagle`` are the mean over the seeds (the
    status when a training failed, see :func:`aggregate_seeds`), ``*_std`` the sample standard
    deviation (empty for one seed), ``rel_diff_pct`` from the means.
    """
    t9 = getattr(cfg, "table9", None)
    want_k = getattr(t9, "k", None)
    seeds = _seeds(cfg)
    cells: dict[tuple[str, str, str], dict[int | None, dict[str, Any]]] = {}
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
        _add_run(cells, key, res, str(path), seeds, f"{method} on {target}/{eval_set}")
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
    named = all("target_name" in c for runs in cells.values() for c in runs.values())
    wanted_targets = getattr(cfg, "table9_targets", None) if named else None
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
    n_seeds = _group_by_seed(cells, seeds, lambda c: f"{c[2]} on {c[0]}/{c[1]}")
    order = seeds or list(dict.fromkeys(s for runs in cells.values() for s in runs))
    cells = {key: {s: runs[s] for s in order if s in runs} for key, runs in cells.items()}
    agg = {key: aggregate_seeds(runs, "/".join(key)) for key, runs in cells.items()}
    rows = []
    for t in targets:
        for s in wanted_sets:
            e3, pe = agg[(t, s, "eagle3")], agg[(t, s, "peagle")]
            rel = None
            if e3["mean"] is not None and pe["mean"] is not None and e3["mean"]:  # from the unrounded means
                rel = round(100.0 * (pe["mean"] - e3["mean"]) / e3["mean"], 1)
            first = {m: next(iter(cells[(t, s, m)].values())) for m in TABLE9_METHODS}
            arch = first["peagle"].get("target_architecture") or first["eagle3"].get("target_architecture")
            rows.append({"target": t, "architecture": arch, "eval_set": s, "k": k, "n_seeds": n_seeds,
                         "eagle3_layers": _layers(first["eagle3"]), "eagle3": e3["value"], "eagle3_std": _std_cell(e3),
                         "peagle_layers": _layers(first["peagle"]), "peagle": pe["value"], "peagle_std": _std_cell(pe),
                         "rel_diff_pct": rel})
    df = pd.DataFrame(rows, columns=TABLE9_COLUMNS)
    for col in ("k", "n_seeds", "eagle3_layers", "peagle_layers"):  # a missing layer count must not turn 4 into 4.0
        df[col] = df[col].astype("Int64")
    spread = "mean over 1 seed (no spread)" if n_seeds == 1 else f"mean and std over {n_seeds} seeds"
    write_table(df, out, table="table9", cfg=cfg, config_files=config_files,
                what=f"acceptance length at K={k}, EAGLE-3 vs P-EAGLE, per target and evaluation set ({spread}); "
                     f"rel_diff_pct = 100 (peagle - eagle3) / eagle3 of the means",
                seed_spread=spread_note(seeds or order, n_seeds),
                cells={f"{t}/{s}/{m}": {**agg[(t, s, m)],
                                        "runs": {str(sd): {k_: v for k_, v in cell.items() if k_ in _CELL_KEYS}
                                                 for sd, cell in cells[(t, s, m)].items()}}
                       for (t, s, m) in sorted(cells)})
    return df


# --------------------------------------------------------------------------- Tables 3-8


def ablation_digest(cfg: Config, table: str) -> str:
    """16 hex digits of what an ablation table's numbers depend on: the config digest (everything but
    the ablations) and the table's plan (its rows' runs, evaluation sets, K). Recorded in its sidecar."""
    import hashlib

    from peagle.ablations import plan_ablations
    from peagle.config import config_from_dict

    plan = plan_ablations(cfg, config_from_dict)[table]
    shape = {"config": cfg.digest(), "table": table, "k": plan.k, "eval_sets": plan.eval_sets,
             "rows": [[r.label, r.run.digest] for r in plan.rows]}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def write_ablation_table(cfg: Config, table: str, evals: list[str], out: str | Path, *,
                         benchmarks: list[str] | None = None, config_files: list[str] | None = None) -> pd.DataFrame:
    """One ablation table (Tables 3-8): acceptance length per row and evaluation set, beside the paper.

    ``evals``: the evaluate-rule JSONs of the table's rows x evaluation sets x seeds, in that order
    (``peagle.ablations.plan_ablations`` gives the rows). Per set: the mean over the seeds (or the
    training status), its sample standard deviation, and the paper's value of the row's paper
    setting (``paper_numbers.csv``; empty where the paper has none). ``benchmarks``: the Snakemake
    benchmark files of the table's training and evaluation jobs (wall times in the provenance).
    """
    from peagle.ablations import plan_ablations
    from peagle.config import config_from_dict

    plans = plan_ablations(cfg, config_from_dict)
    if table not in plans:
        raise TableError(f"{table}: not an ablation table of this config (ablations define {', '.join(plans)})")
    plan = plans[table]
    seeds = _seeds(cfg) or [None]
    want = len(plan.rows) * len(plan.eval_sets) * len(seeds)
    if len(evals) != want:
        raise TableError(f"{table}: {len(evals)} evaluation files for {len(plan.rows)} rows x "
                         f"{len(plan.eval_sets)} sets x {len(seeds)} seeds = {want}; re-run snakemake")
    paper = paper_numbers()
    paper = paper[(paper["table"] == table) & (paper["metric"] == "acceptance_length")]
    it = iter(evals)
    rows, cells = [], {}
    for row in plan.rows:
        out_row: dict[str, Any] = {"row": row.label, "setting": plan.setting, "value": row.value,
                                   "paper_setting": row.paper, "run": row.run.digest}
        for eval_set in plan.eval_sets:
            holder: dict[str, dict[int | None, dict[str, Any]]] = {}
            for seed in seeds:
                path = next(it)
                res = _load_eval(path)
                if res.get("eval_set") != eval_set or int(res.get("k", -1)) != plan.k:
                    raise TableError(f"{path}: a result for {res.get('eval_set')} at K={res.get('k')}, expected "
                                     f"{eval_set} at K={plan.k} ({row.label}); re-run snakemake")
                _add_run(holder, row.label, res, str(path), None if seed is None else [seed],
                         f"{row.label} on {eval_set}")
            runs = holder[row.label]
            agg = aggregate_seeds(runs, f"{table}/{row.label}/{eval_set}")
            hit = paper[(paper["dataset"] == eval_set) & (paper["setting"] == (row.paper or ""))]["value"]
            out_row.update({eval_set: agg["value"], f"{eval_set}_std": _std_cell(agg),
                            f"{eval_set}_paper": float(hit.iloc[0]) if len(hit) and hit.iloc[0] != "unknown" else None})
            cells[f"{row.label}/{eval_set}"] = {**agg, "runs": {str(sd): {k: v for k, v in c.items() if k in _CELL_KEYS}
                                                               for sd, c in runs.items()}}
        rows.append({**out_row, "n_seeds": len(seeds)})
    df = pd.DataFrame(rows)
    times = {str(b): read_benchmark(b).get("s") for b in benchmarks or []}
    spread = "mean over 1 seed (no spread)" if len(seeds) == 1 else f"mean and std over {len(seeds)} seeds"
    write_table(df, out, table=table, cfg=cfg, config_files=config_files,
                what=f"acceptance length at K={plan.k} on {', '.join(plan.eval_sets)} per {plan.setting} "
                     f"({spread}), {plan.method} on {plan.target}; the paper's value beside each",
                ablation_digest=ablation_digest(cfg, table), ablation_group=plan.group, scale=plan.scale,
                shared_settings=plan.carried, seed_spread=spread_note(_seeds(cfg), len(seeds)),
                runs={r.run.digest: {"ctx": r.run.ctx, "overrides": dict(r.run.overrides),
                                     "profile_settings": r.run.profile_settings} for r in plan.rows},
                cells=cells, wall_times_s=times, wall_time_total_s=sum(v for v in times.values() if v))
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
    seeds = _seeds(cfg)
    write_table(df, out, table="table10", cfg=cfg, config_files=config_files,
                drafter_seed={"seed": seeds[0] if seeds else None,
                              "note": "one drafter per cell: the DAG serves the first of train.seeds (no seed spread)"},
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
