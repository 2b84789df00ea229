"""Regenerated tables beside the paper's recorded numbers, with a verdict on their qualitative shape.

``peagle compare`` reads whatever of ``table1.csv``, ``table2.csv``, ``table9.csv``,
``drafting_cost.csv`` and ``table10.csv`` the tables directory holds, prints each next to the paper's numbers
(``peagle/resources/paper_numbers.csv``) and says, in a few lines, whether the shape agrees: who
wins each column, which cells fail, which way the differences point. Absolute numbers are not
expected to agree (tiny CPU models vs 20B-120B targets on H200s); the shape is what is compared.
A missing table or cell is reported, never fatal.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd

from peagle.provenance import read_provenance, sidecar
from peagle.tables import NEAR_BUDGET, paper_numbers

FAILED = ("OOM", "infeasible")
TABLES = ("table1", "table2", "table3", "table4", "table5", "table6", "table7", "table8", "table9", "drafting_cost",
          "table10")
# The paper's claim behind each ablation table, and how its rows should order if it holds.
ABLATION_CLAIMS = {
    "table3": ("(3) the shared h_shared is at least as good as every position-aware alternative", "first_best"),
    "table4": ("(4) acceptance rises with drafter layers (1 -> 2 -> 4)", "rises"),
    "table5": ("(5) trainable embeddings beat frozen ones", "rises"),
    "table6": ("(6) training at K=8 beats K=5 at K_infer=5", "rises"),
    "table7": ("more epochs help (20 -> 40 -> 60)", "rises"),
    "table8": ("a longer training length helps (512 -> 2048)", "rises"),
}
EVAL_SET_ORDER = ("mt_bench", "humaneval", "gsm8k")
METHOD_NAMES = {"eagle3": "EAGLE-3", "peagle": "P-EAGLE", "pard": "PARD", "parallelspec": "ParallelSpec"}


# --------------------------------------------------------------------------- helpers


def render(df: pd.DataFrame) -> str:
    """Markdown table when ``tabulate`` is installed, else pandas' plain text."""
    if df.empty:
        return "(empty)"
    if importlib.util.find_spec("tabulate") is not None:
        return df.to_markdown(index=False)
    return df.to_string(index=False)


def parse_cell(value: Any) -> float | str | None:
    """A table cell -> float, a failure string (``OOM``/``infeasible``), another string, or None if empty."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if text == "" or text.lower() in ("nan", "none", "unknown"):
        return None
    try:
        return float(text)
    except ValueError:
        pass
    for f in FAILED:
        if text.lower() == f.lower():
            return f
    return text


def _bound(value: Any) -> tuple[float | None, str]:
    """Paper value -> (number, qualifier): '>12' -> (12.0, '>'), '2.4' -> (2.4, ''), else (None, '')."""
    v = parse_cell(value)
    if isinstance(v, float):
        return v, ""
    if isinstance(v, str):
        m = re.fullmatch(r"([<>]=?)\s*([0-9.]+)", v)
        if m:
            return float(m.group(2)), m.group(1)
    return None, ""


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}".rstrip("0").rstrip(".") if nd else f"{v:.0f}"
    return str(v)


def _name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _status(v: float | str | None) -> str:
    if v is None:
        return "missing"
    if isinstance(v, float):
        return "ok"
    if v in FAILED:
        return v
    return "mixed" if _MIXED.fullmatch(v) else "other"


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _paper(table: str) -> pd.DataFrame:
    p = paper_numbers()
    return p[p["table"] == table].fillna("")


# --------------------------------------------------------------------------- seeds and spread

TIE_RULE = ("two values whose difference is at most the larger of their standard deviations over seeds are a "
            "TIE (within the seed spread), neither a match nor a difference")
# A cell whose seeds did not all end alike (peagle.tables.aggregate_seeds), e.g. "OOM (2/3 seeds)".
_MIXED = re.compile(r"(?:OOM|infeasible) \(\d+/\d+ seeds\)(?:; (?:OOM|infeasible) \(\d+/\d+ seeds\))*")


def _std(value: Any) -> float | None:
    """A ``*_std`` cell -> a positive spread, or None (one seed, no value)."""
    v = parse_cell(value)
    return v if isinstance(v, float) and v > 0 else None


def _n_seeds(df: pd.DataFrame, provenance: dict[str, Any] | None) -> tuple[int, list[int] | None]:
    """Seeds per cell (1 for a table from before seeds were counted) and the seed list, if known."""
    seeds = ((provenance or {}).get("seed_spread") or {}).get("seeds")
    if seeds is None:
        train = ((provenance or {}).get("seeds") or {}).get("train")
        seeds = train if isinstance(train, list) else None
    n = 1
    if "n_seeds" in df.columns:
        counts = [v for v in map(parse_cell, df["n_seeds"]) if isinstance(v, float)]
        n = int(max(counts)) if counts else 1
    return n, seeds


def spread_line(n_seeds: int, seeds: list[int] | None = None) -> str:
    """What the verdicts of a table can tell apart: with one seed nothing is tested against noise."""
    listed = f" (train.seeds {seeds})" if seeds else ""
    if n_seeds <= 1:
        return (f"Seeds: 1 seed, no spread{listed}: each cell is a single training run, so no verdict below tells "
                "a difference from seed noise (config/tiny-seeds.yaml trains three seeds per cell).")
    return (f"Seeds: {n_seeds} per cell{listed}; cells are mean ± sample standard deviation. Tie rule: {TIE_RULE}.")


def _spread(*stds: float | None) -> float | None:
    vals = [s for s in stds if s is not None]
    return max(vals) if vals else None


def _tie(a: float, b: float, *stds: float | None) -> bool:
    """|a - b| within the larger standard deviation (never without a spread)."""
    spread = _spread(*stds)
    return spread is not None and abs(a - b) <= spread + 1e-12


def _pm(v: Any, std: float | None) -> str:
    return _fmt(v) + (f" ± {_fmt(std)}" if std is not None and isinstance(v, float) else "")


# --------------------------------------------------------------------------- Table 1


def _paper_ctx(setting: str) -> int | None:
    m = re.fullmatch(r"ctx=(\d+)", setting)
    return int(m.group(1)) if m else None


def _near_budget(df: pd.DataFrame) -> dict[tuple[str, str], str] | None:
    """(method, ctx column) -> margin text ("+4.0%") of the cells Table 1 flags near_budget; None
    when the table has no near_budget column (made before memory peaks were recorded)."""
    if "near_budget" not in df.columns:
        return None
    out: dict[tuple[str, str], str] = {}
    for r in df.to_dict("records"):
        for col, margin in re.findall(r"(ctx=\d+) \(([+-]?[0-9.]+%)\)", str(r.get("near_budget") or "")):
            out[(r["method"], col)] = margin
    return out


def compare_table1(df: pd.DataFrame, provenance: dict[str, Any] | None) -> list[str]:
    lines = ["## Table 1: acceptance length vs training context length (MT-Bench, K=5)", ""]
    paper = _paper("table1")
    paper_cells = {(r.method, _paper_ctx(r.setting)): parse_cell(r.value) for r in paper.itertuples()}
    paper_methods = list(dict.fromkeys(paper["method"]))
    paper_ctxs = sorted({c for (_, c) in paper_cells if c is not None})
    if "method" not in df.columns:
        return lines + ["table1.csv has no 'method' column; cannot compare."]
    cols = [c for c in df.columns if re.fullmatch(r"ctx=\d+", c)]
    if not cols:
        return lines + ["table1.csv has no ctx=... columns; cannot compare."]
    n_seeds, seeds = _n_seeds(df, provenance)
    lines.append(spread_line(n_seeds, seeds))
    mapping: dict[str, int | None] = {}
    prov_map = (provenance or {}).get("paper_contexts") or {}
    if prov_map:
        mapping = {c: (int(prov_map[c]) if c in prov_map else None) for c in cols}
        unmapped = [c for c, p in mapping.items() if p is None]
        if unmapped:
            lines.append(f"Note: table1.provenance.json maps no paper context for {unmapped}.")
    elif len(cols) == len(paper_ctxs):
        mapping = dict(zip(cols, paper_ctxs))
        lines.append("Note: no paper_contexts in table1.provenance.json; columns mapped to the paper's "
                     f"{paper_ctxs} by position.")
    else:
        mapping = {c: None for c in cols}
        lines.append(f"Note: no paper_contexts in table1.provenance.json and {len(cols)} columns vs the "
                     f"paper's {len(paper_ctxs)}; paper columns not mapped.")
    ours: dict[tuple[str, str], float | str | None] = {}
    stds: dict[tuple[str, str], float | None] = {}
    layers: dict[str, str] = {}
    for r in df.to_dict("records"):
        layers[r["method"]] = r.get("layers", "")
        for c in cols:
            ours[(r["method"], c)] = parse_cell(r.get(c))
            stds[(r["method"], c)] = _std(r.get(f"{c}_std"))
    near = _near_budget(df)
    our_methods = list(dict.fromkeys(df["method"]))
    methods = [m for m in paper_methods if m in our_methods] + [m for m in our_methods if m not in paper_methods]
    methods += [m for m in paper_methods if m not in methods]

    def ours_text(m: str, c: str) -> str:
        return _pm(ours.get((m, c)), stds.get((m, c))) + (" †" if near and (m, c) in near else "")

    rows = []
    for m in methods:
        row: dict[str, Any] = {"method": m, "layers": layers.get(m, "")}
        for c in cols:
            p = mapping.get(c)
            row[f"{c} ours"] = ours_text(m, c) if m in our_methods else "(no row)"
            row[f"paper ctx={p}" if p else f"{c} paper"] = _fmt(paper_cells.get((m, p))) if p else "-"
        rows.append(row)
    lines += ["", render(pd.DataFrame(rows)), ""]
    if near is None:
        lines.append("Memory: table1.csv records no training memory peaks (made before near_budget); not checked.")
    elif near:
        lines.append(f"† near budget: the training memory peak lies within ±{NEAR_BUDGET:.0%} of the memory budget "
                     "(peak / budget - 1) in " + ", ".join(f"{_name(m)} @ {c} ({v})" for (m, c), v in near.items())
                     + "; whether such a cell trains or is OOM may flip on another machine.")
    else:
        lines.append(f"Memory: no cell's training memory peak lies within ±{NEAR_BUDGET:.0%} of its budget.")
    absent = [m for m in paper_methods if m not in our_methods]
    if absent:
        lines.append(f"Missing: our table has no row for {', '.join(_name(m) for m in absent)} (the paper has).")

    # Winner per column.
    lines.append("Best method per column (highest AL):")
    for c in cols:
        p = mapping.get(c)
        ours_num = {m: v for m in our_methods if isinstance(v := ours.get((m, c)), float)}
        paper_num = {m: v for m in paper_methods if p and isinstance(v := paper_cells.get((m, p)), float)}
        paper_best = _winners(paper_num)
        where = f"{c}" + (f" (paper {p})" if p else "")
        if len(ours_num) < 2:
            have = ", ".join(f"{_name(m)} {v:.3f}" for m, v in ours_num.items()) or "none"
            lines.append(f"- {where}: fewer than two methods with a value in ours ({have}); paper best "
                         f"{_join(paper_best, paper_num)} - not compared")
            continue
        our_best = _winners(ours_num)
        top = our_best[0]
        within = [m for m in ours_num if m not in our_best
                  and _tie(ours_num[m], ours_num[top], stds.get((m, c)), stds.get((top, c)))]
        # Equal means with a spread are a tie within it as well (without one: an exact tie, as before).
        spread_tie = bool(within) or (len(our_best) > 1 and _spread(*(stds.get((m, c)) for m in our_best)) is not None)
        ours_txt = _join(our_best, ours_num, {m: stds.get((m, c)) for m in ours_num})
        if within:
            ours_txt += ", within the seed spread of " + ", ".join(
                f"{_name(m)} {_pm(ours_num[m], stds.get((m, c)))}" for m in within)
        if not paper_best:
            verdict = "no paper value to compare"
        elif spread_tie:
            verdict = "TIE (the best and the runner-up differ by less than their spread)"
        elif set(our_best) & set(paper_best):
            verdict = "MATCH"
        else:
            verdict = "DIFFERS"
        lines.append(f"- {where}: ours {ours_txt}; paper {_join(paper_best, paper_num)} -> {verdict}")

    # Failing-cell pattern, cell by cell.
    compared, agree, kind_differs, mismatches, missing, mixed = 0, 0, [], [], [], []
    for m in methods:
        for c in cols:
            p = mapping.get(c)
            if p is None or (m, p) not in paper_cells:
                continue
            ps, os_ = _status(paper_cells[(m, p)]), _status(ours.get((m, c)))
            if os_ == "missing":
                missing.append(f"{_name(m)} @ {c}")
                continue
            if os_ == "mixed":
                mixed.append(f"{_name(m)} @ {c}: {ours.get((m, c))}")
                continue
            compared += 1
            if (ps in FAILED) == (os_ in FAILED):
                agree += 1
                if ps in FAILED and ps != os_:
                    kind_differs.append(f"{_name(m)} @ {c}: ours {os_}, paper {ps}")
            else:
                mismatches.append(f"{_name(m)} @ {c} (paper ctx={p}): ours {_fmt(ours.get((m, c)))}, "
                                  f"paper {_fmt(paper_cells[(m, p)])}")
    n_fail_ours = sum(1 for v in ours.values() if v in FAILED)
    n_fail_paper = sum(1 for v in paper_cells.values() if v in FAILED)
    if compared == 0:
        lines.append("Failing cells (OOM/infeasible): no cell of ours has a paper counterpart; not compared.")
    elif not mismatches:
        lines.append(f"Failing cells (OOM/infeasible): MATCH the paper's pattern in all {compared} compared cells "
                     f"({n_fail_ours} failing in ours, {n_fail_paper} in the paper's table).")
    else:
        lines.append(f"Failing cells (OOM/infeasible): DIFFER from the paper's pattern in {len(mismatches)} of "
                     f"{compared} compared cells: " + "; ".join(mismatches))
    if kind_differs:
        lines.append("  Both fail, but for a different reason: " + "; ".join(kind_differs))
    if mixed:
        lines.append("  Seeds disagree (some seeds train, others fail; not compared): " + "; ".join(mixed))
    if missing:
        lines.append(f"  Not compared (no value in ours): {', '.join(missing)}")

    # P-EAGLE vs context.
    pe_ours = [(c, ours.get(("peagle", c))) for c in cols]
    pe_paper = [(p, paper_cells.get(("peagle", p))) for p in paper_ctxs]
    paper_trend = _trend([v for _, v in pe_paper])
    if "peagle" not in our_methods:
        lines.append(f"P-EAGLE vs context: no P-EAGLE row in ours; paper {paper_trend}.")
    else:
        vals = [v for _, v in pe_ours]
        ours_trend = _trend(vals, [stds.get(("peagle", c)) for c in cols])
        if ours_trend.startswith("not enough"):
            verdict = "not compared"
        elif "within the seed spread" in ours_trend.split(" (")[0]:
            verdict = "TIE (first and last context differ by less than their spread)"
        else:
            verdict = "MATCH" if ours_trend.split(" (")[0] == paper_trend.split(" (")[0] else "DIFFERS"
        lines.append(f"P-EAGLE vs context: ours {ours_trend}; paper {paper_trend} -> {verdict}")
    return lines


def _winners(vals: dict[str, float]) -> list[str]:
    if not vals:
        return []
    best = max(vals.values())
    return [m for m, v in vals.items() if abs(v - best) < 1e-9]


def _join(methods: list[str], vals: dict[str, float], stds: dict[str, float | None] | None = None) -> str:
    if not methods:
        return "-"
    tie = " (tie)" if len(methods) > 1 else ""
    std = (stds or {}).get(methods[0])
    return " = ".join(_name(m) for m in methods) + f" {vals[methods[0]]:.3f}" + (f" ± {std:.3f}" if std else "") + tie


def _trend(vals: list[Any], stds: list[float | None] | None = None) -> str:
    """Rises / flat / does not rise; with ``stds``, a step within the larger spread counts as flat."""
    stds = stds or [None] * len(vals)
    pairs = [(v, s) for v, s in zip(vals, stds) if isinstance(v, float)]
    shown = " -> ".join(_pm(v, s) for v, s in zip(vals, stds))
    if len(pairs) < 2:
        return f"not enough values ({shown})"
    steps = list(zip(pairs, pairs[1:]))
    (first, s_first), (last, s_last) = pairs[0], pairs[-1]
    overall_tie = _tie(first, last, s_first, s_last)
    no_fall = all(b >= a or _tie(a, b, sa, sb) for (a, sa), (b, sb) in steps)
    if overall_tie:
        word = "flat within the seed spread" if no_fall else "flat within the seed spread, not monotonically"
    elif no_fall:
        word = "rises with context" if last > first else "flat"
    elif last > first:
        word = "rises overall, not monotonically"
    else:
        word = "does not rise"
    gaps = " (failing/missing cells skipped)" if len(pairs) < len(vals) else ""
    return f"{word} ({shown}){gaps}"


# --------------------------------------------------------------------------- Tables 3-8


def compare_ablation(name: str, df: pd.DataFrame, provenance: dict[str, Any] | None = None) -> list[str]:
    """An ablation table (rows = values of one setting) beside the paper, and whether its claim holds
    per evaluation set: ties within the seed spread count as ties, as for Tables 1 and 9."""
    claim, shape = ABLATION_CLAIMS.get(name, ("the paper's ordering of the rows", "rises"))
    sets = [s for s in EVAL_SET_ORDER if s in df.columns]
    n_seeds, seeds = _n_seeds(df, provenance)
    scale = (provenance or {}).get("scale")
    out = [f"## {name}: {df['setting'].iloc[0]}" + (f" (tiny scale: {scale})" if scale else ""),
           f"Claim {claim}."]
    show = df[["row", "paper_setting"]].copy()
    for s in sets:
        show[f"{s} (ours)"] = [_pm(parse_cell(v), _std(sd)) for v, sd in zip(df[s], df[f"{s}_std"])]
        show[f"{s} (paper)"] = [_fmt(parse_cell(v)) for v in df[f"{s}_paper"]]
    out += [render(show), "", spread_line(n_seeds, seeds)]
    for s in sets:
        vals = [parse_cell(v) for v in df[s]]
        stds = [_std(v) for v in df[f"{s}_std"]]
        paper = [parse_cell(v) for v in df[f"{s}_paper"]]
        if shape == "first_best":
            first, s0 = vals[0], stds[0]
            if not isinstance(first, float):
                out.append(f"- {s}: the first row did not train ({first}); no verdict.")
                continue
            beaten = [r for r, v, sd in zip(df["row"][1:], vals[1:], stds[1:])
                      if isinstance(v, float) and v > first and not _tie(first, v, s0, sd)]
            tied = [r for r, v, sd in zip(df["row"][1:], vals[1:], stds[1:]) if isinstance(v, float) and _tie(first, v, s0, sd)]
            verdict = ("holds" if not beaten else f"fails: {', '.join(beaten)} beat(s) it") + (
                f" ({', '.join(tied)} tie within the spread)" if tied else "")
            p_ok = all(isinstance(p, float) and p <= paper[0] for p in paper[1:]) if isinstance(paper[0], float) else None
            out.append(f"- {s}: {df['row'].iloc[0]} {_pm(first, s0)}; claim {verdict}"
                       + ("" if p_ok is None else f"; in the paper it {'holds' if p_ok else 'fails'}") + ".")
        else:
            trend = _trend(vals, stds).replace("rises with context", "rises")
            p_trend = _trend([p for p in paper if isinstance(p, float)]).replace("rises with context", "rises")
            out.append(f"- {s}: ours {trend}; the paper {p_trend}.")
    return out


# --------------------------------------------------------------------------- Table 2


def compare_table2(df: pd.DataFrame) -> list[str]:
    lines = ["## Table 2: training overhead per data path", ""]
    paper = _paper("table2")
    p_load = {r.method: _bound(r.value) for r in paper.itertuples() if r.metric == "load_s_128_examples"}
    p_epoch = {r.method: _bound(r.value) for r in paper.itertuples() if r.metric == "epoch_hours"}
    if "method" not in df.columns:
        return lines + ["table2.csv has no 'method' column; cannot compare."]
    load_col = next((c for c in df.columns if re.fullmatch(r"load_s_\d+_examples", c)), None)
    epoch_col = "epoch_s" if "epoch_s" in df.columns else None
    ours = {r["method"]: r for r in df.to_dict("records")}
    ref = "peagle" if "peagle" in ours else None

    def num(method: str, col: str | None) -> float | None:
        v = parse_cell(ours.get(method, {}).get(col)) if col else None
        return v if isinstance(v, float) else None

    def ratio(method: str, col: str | None) -> float | None:
        a, b = num(method, col), num(ref, col) if ref else None
        return a / b if a is not None and b else None

    def pratio(table: dict, method: str) -> tuple[float | None, str]:
        (a, qa), (b, _) = table.get(method, (None, "")), table.get("peagle", (None, ""))
        return (a / b if a is not None and b else None), qa

    methods = [m for m in ("eagle3", "pard", "peagle") if m in ours or m in p_load] + \
        [m for m in ours if m not in ("eagle3", "pard", "peagle")]
    rows = []
    for m in methods:
        pl, ql = p_load.get(m, (None, ""))
        pe, qe = p_epoch.get(m, (None, ""))
        rl, rql = pratio(p_load, m)
        re_, rqe = pratio(p_epoch, m)
        rows.append({
            "method": m,
            f"ours {load_col or 'load_s'}": _fmt(num(m, load_col)) if m in ours else "(no row)",
            "ours load / P-EAGLE": _fmt(ratio(m, load_col), 2),
            "paper load_s_128_examples": (ql + _fmt(pl)) if pl is not None else "-",
            "paper load / P-EAGLE": (rql + _fmt(rl, 2)) if rl is not None else "-",
            "ours epoch_s": _fmt(num(m, epoch_col)) if m in ours else "(no row)",
            "ours epoch / P-EAGLE": _fmt(ratio(m, epoch_col), 2),
            "paper epoch_hours (8xH200)": (qe + _fmt(pe)) if pe is not None else "-",
            "paper epoch / P-EAGLE": (rqe + _fmt(re_, 2)) if re_ is not None else "-",
        })
    lines += [render(pd.DataFrame(rows)), ""]
    if ref is None:
        return lines + ["No P-EAGLE row in ours: ratios to P-EAGLE cannot be formed; not compared."]
    for label, col, ptable in (("Data loading", load_col, p_load), ("Epoch time", epoch_col, p_epoch)):
        for m in ("pard", "eagle3"):
            pr, q = pratio(ptable, m)
            if m not in ours:
                lines.append(f"- {label}, {_name(m)}/P-EAGLE: no {_name(m)} row in ours (paper {q}{_fmt(pr, 2)}x)"
                             if pr is not None else f"- {label}, {_name(m)}/P-EAGLE: not in ours")
                continue
            r = ratio(m, col)
            if r is None:
                lines.append(f"- {label}, {_name(m)}/P-EAGLE: no value in ours (column {col})")
                continue
            if pr is None:
                lines.append(f"- {label}, {_name(m)}/P-EAGLE: ours {r:.2f}x; no paper value")
                continue
            same = (r > 1) == (pr > 1)
            word = "slower" if pr > 1 else "faster"
            size = ""
            if same and r > 0 and pr > 0:
                f = math.log(r) / math.log(pr) if abs(math.log(pr)) > 1e-9 else float("nan")
                size = ("; size: ours much weaker" if f < 1 / 3 else "; size: ours much stronger" if f > 3
                        else "; size: similar on a log scale") if f == f else ""
                if q.startswith(">") and f > 1:
                    size = "; size: at least the paper's (a lower bound there)"
            lines.append(f"- {label}, {_name(m)}/P-EAGLE: ours {r:.2f}x, paper {q}{pr:.2f}x -> "
                         f"{'MATCH' if same else 'DIFFERS'} in direction (paper: {_name(m)} {word} than "
                         f"P-EAGLE){size}")
    extra = [m for m in ours if m not in ("eagle3", "pard", "peagle")]
    for m in extra:
        lines.append(f"- {m} (ours only, no paper counterpart): load {_fmt(ratio(m, load_col), 2)}x, "
                     f"epoch {_fmt(ratio(m, epoch_col), 2)}x P-EAGLE")
    return lines


# --------------------------------------------------------------------------- Table 9


def _pct(x: float) -> str:
    return "0.0%" if round(x, 1) == 0 else f"{x:+.1f}%"


def compare_table9(df: pd.DataFrame, provenance: dict[str, Any] | None = None) -> list[str]:
    lines = ["## Table 9: EAGLE-3 vs P-EAGLE acceptance length (K=5)", ""]
    need = {"target", "eval_set", "eagle3", "peagle"}
    if not need <= set(df.columns):
        return lines + [f"table9.csv lacks columns {sorted(need - set(df.columns))}; cannot compare."]
    n_seeds, seeds = _n_seeds(df, provenance)
    lines += [spread_line(n_seeds, seeds), ""]
    paper = _paper("table9")
    pv = {(r.target, r.dataset, r.method): parse_cell(r.value) for r in paper.itertuples()}
    prow = []
    for t in dict.fromkeys(paper["target"]):
        for s in EVAL_SET_ORDER:
            e3, pe = pv.get((t, s, "eagle3")), pv.get((t, s, "peagle"))
            if e3 is None and pe is None:
                continue
            rel = 100 * (pe - e3) / e3 if isinstance(e3, float) and isinstance(pe, float) and e3 else None
            prow.append({"target": t, "eval_set": s, "eagle3": e3, "peagle": pe, "rel_diff_pct": rel, "tie": False})
    ours = []
    for r in df.to_dict("records"):
        e3, pe = parse_cell(r["eagle3"]), parse_cell(r["peagle"])
        s3, sp = _std(r.get("eagle3_std")), _std(r.get("peagle_std"))
        num = isinstance(e3, float) and isinstance(pe, float)
        rel = 100 * (pe - e3) / e3 if num and e3 else None
        ours.append({"target": r["target"], "eval_set": r["eval_set"], "eagle3": e3, "peagle": pe, "rel_diff_pct": rel,
                     "eagle3_std": s3, "peagle_std": sp, "tie": num and rel is not None and _tie(pe, e3, s3, sp)})

    def show(rows: list[dict]) -> pd.DataFrame:
        return pd.DataFrame([{"target": r["target"], "eval_set": r["eval_set"],
                              "eagle3": _pm(r["eagle3"], r.get("eagle3_std")),
                              "peagle": _pm(r["peagle"], r.get("peagle_std")),
                              "rel_diff_pct": "-" if r["rel_diff_pct"] is None else
                              _pct(r["rel_diff_pct"]) + (" (tie)" if r["tie"] else "")}
                             for r in rows])

    def cell_txt(r: dict) -> str:
        if r["rel_diff_pct"] is None:
            return f"{r['target']} n/a ({_fmt(r['eagle3'])} vs {_fmt(r['peagle'])})"
        return f"{r['target']} {_pct(r['rel_diff_pct'])}" + (" (tie within the seed spread)" if r["tie"] else "")

    lines += ["Ours:", render(show(ours)), "", "Paper (different, much larger targets):", render(show(prow)), ""]
    lines.append("Sign of P-EAGLE - EAGLE-3 per evaluation set (targets differ, so compared by set"
                 + ("; a difference within the seed spread is a tie and counts for neither sign):" if n_seeds > 1
                    else "):"))
    sets = [s for s in EVAL_SET_ORDER if any(r["eval_set"] == s for r in ours + prow)]
    sets += sorted({r["eval_set"] for r in ours} - set(sets))
    for s in sets:
        o = [r for r in ours if r["eval_set"] == s]
        p = [r for r in prow if r["eval_set"] == s]
        o_num = [r for r in o if r["rel_diff_pct"] is not None]
        o_ok = [r for r in o_num if not r["tie"]]
        ties = len(o_num) - len(o_ok)
        o_ge = sum(r["rel_diff_pct"] >= 0 for r in o_ok)
        p_ge = sum(r["rel_diff_pct"] >= 0 for r in p if r["rel_diff_pct"] is not None)
        o_txt = ", ".join(cell_txt(r) for r in o) or "no rows"
        p_txt = ", ".join(f"{r['target']} {_pct(r['rel_diff_pct'])}"
                          for r in p if r["rel_diff_pct"] is not None) or "no rows"
        if not o_num:
            verdict = "not compared (no value in ours)"
        elif not o_ok:
            verdict = "TIE (every difference of ours is within the seed spread)"
        elif not p:
            verdict = "no paper value"
        else:
            paper_all = p_ge == len(p)
            verdict = "MATCH" if (o_ge == len(o_ok)) == paper_all else "DIFFERS"
            if ties:
                verdict += f" ({ties} tie(s) within the seed spread not counted)"
        beyond = " outside the seed spread" if ties else ""
        lines.append(f"- {s}: P-EAGLE >= EAGLE-3 on {o_ge}/{len(o_ok)} of our targets{beyond} [{o_txt}]; "
                     f"paper {p_ge}/{len(p)} [{p_txt}] -> {verdict}")
    o_num = [r for r in ours if r["rel_diff_pct"] is not None]
    o_ok = [r for r in o_num if not r["tie"]]
    p_ok = [r for r in prow if r["rel_diff_pct"] is not None]
    o_ge, o_gt = sum(r["rel_diff_pct"] >= 0 for r in o_ok), sum(r["rel_diff_pct"] > 0 for r in o_ok)
    p_ge, p_gt = sum(r["rel_diff_pct"] >= 0 for r in p_ok), sum(r["rel_diff_pct"] > 0 for r in p_ok)
    n_bad = len(ours) - len(o_num)
    ties = len(o_num) - len(o_ok)
    lines.append(f"Overall: P-EAGLE >= EAGLE-3 in {o_ge} of {len(o_ok)} cells in ours (strictly better in {o_gt}), "
                 f"paper {p_ge} of {len(p_ok)} (strictly better in {p_gt})"
                 + (f"; {ties} of our cells are ties within the seed spread" if ties else "")
                 + (f"; {n_bad} of our cells have no numeric value" if n_bad else "") + ".")
    if o_num:
        mean_o = sum(r["rel_diff_pct"] for r in o_num) / len(o_num)
        mean_p = sum(r["rel_diff_pct"] for r in p_ok) / len(p_ok) if p_ok else float("nan")
        lines.append(f"Mean relative difference: ours {mean_o:+.1f}%, paper {mean_p:+.1f}%.")
    return lines


# --------------------------------------------------------------------------- drafting cost


def compare_drafting_cost(df: pd.DataFrame) -> list[str]:
    lines = ["## Drafting cost vs K (CPU counterpart of Table 10)", ""]
    need = {"method", "k", "draft_ms_per_round"}
    if not need <= set(df.columns):
        return lines + [f"drafting_cost.csv lacks columns {sorted(need - set(df.columns))}; cannot compare."]
    d = df.copy()
    if "target_name" not in d.columns:
        d["target_name"] = "?"
    for c in ("k", "draft_ms_per_round", "verify_ms_per_round", "output_tokens_per_s", "acceptance_length"):
        if c in d.columns:
            d[c] = pd.to_numeric(d[c], errors="coerce")
    show = [c for c in ("target_name", "method", "drafter_layers", "k", "draft_ms_per_round", "verify_ms_per_round",
                        "acceptance_length", "output_tokens_per_s") if c in d.columns]
    lines += [render(d[show]), ""]
    paper = _paper("table10")
    if not paper.empty:
        lines += ["Paper Table 10 (vLLM, 1xH200, concurrency 2/4; output tokens/s or speedup):",
                  render(paper[["target", "dataset", "method", "setting", "metric", "value"]]), ""]
    lines.append("Seeds: 1 seed, no spread: one drafter per method, the first of train.seeds, and one timing "
                 "run per K, so the verdict below is not tested against noise.")
    lines.append("Drafting time per round from the smallest to the largest K (paper's mechanism: EAGLE-3 grows "
                 "with K, P-EAGLE does not):")
    growth: dict[tuple[str, str], float] = {}
    for (t, m), g in d.groupby(["target_name", "method"], sort=False):
        g = g.dropna(subset=["k", "draft_ms_per_round"]).sort_values("k")
        if len(g) < 2:
            lines.append(f"- {t} {_name(m)}: fewer than two K values; not compared")
            continue
        lo, hi = g.iloc[0], g.iloc[-1]
        r = hi["draft_ms_per_round"] / lo["draft_ms_per_round"] if lo["draft_ms_per_round"] else float("nan")
        growth[(t, m)] = r
        best = ""
        if "output_tokens_per_s" in g.columns and g["output_tokens_per_s"].notna().any():
            b = g.loc[g["output_tokens_per_s"].idxmax()]
            best = f"; best output tokens/s {b['output_tokens_per_s']:.1f} at K={int(b['k'])}"
        lines.append(f"- {t} {_name(m)}: {lo['draft_ms_per_round']:.2f} ms (K={int(lo['k'])}) -> "
                     f"{hi['draft_ms_per_round']:.2f} ms (K={int(hi['k'])}), x{r:.2f}{best}")
    for t in dict.fromkeys(d["target_name"]):
        e3, pe = growth.get((t, "eagle3")), growth.get((t, "peagle"))
        if e3 is None or pe is None:
            lines.append(f"- {t}: needs both EAGLE-3 and P-EAGLE rows at two or more K; not compared")
            continue
        ok = e3 > pe
        lines.append(f"- {t}: EAGLE-3 drafting grows x{e3:.2f}, P-EAGLE x{pe:.2f} -> "
                     f"{'MATCH' if ok else 'DIFFERS'} (expected EAGLE-3's growth to exceed P-EAGLE's)")
    return lines


# --------------------------------------------------------------------------- Table 10


def _paper_speedups() -> dict[tuple[str, str, int], tuple[float, float, str]]:
    """(target, dataset, concurrency) -> (low, high, how) P-EAGLE / EAGLE-3 speedup in the paper's Table 10.

    Given directly (ranges like ``1.04-1.10`` over the evaluation sets) or formed from the two
    tokens/s values the paper reports for that target and concurrency.
    """
    paper = _paper("table10")
    tok: dict[tuple[str, str, int], dict[str, tuple[float, str]]] = {}
    out: dict[tuple[str, str, int], tuple[float, float, str]] = {}
    for r in paper.itertuples():
        m = re.search(r"concurrency=(\d+)", r.setting)
        if not m:
            continue
        key = (r.target, r.dataset, int(m.group(1)))
        setting = r.setting.split(" concurrency")[0]
        if r.metric == "speedup":
            lo, _, hi = str(r.value).partition("-")
            out[key] = (float(lo), float(hi or lo), f"reported ({setting})")
        elif r.metric == "output_tokens_per_s":
            tok.setdefault(key, {})[r.method] = (float(r.value), setting)
    for key, d in tok.items():
        if "peagle" in d and "eagle3" in d and key not in out:
            (p, ps), (e, es) = d["peagle"], d["eagle3"]
            out[key] = (p / e, p / e, f"P-EAGLE {ps} {p:.0f} / EAGLE-3 {es} {e:.0f} tok/s")
    return out


def compare_table10(df: pd.DataFrame) -> list[str]:
    lines = ["## Table 10: vLLM output tokens/s, P-EAGLE vs EAGLE-3 at its best K", ""]
    need = {"target", "eval_set", "concurrency", "speedup_best"}
    if not need <= set(df.columns):
        return lines + [f"table10.csv lacks columns {sorted(need - set(df.columns))}; cannot compare."]
    show = [c for c in ("target", "eval_set", "concurrency", "eagle3_k", "eagle3_tok_s", "peagle_best_k",
                        "speedup_best") if c in df.columns]
    lines += ["Ours (tiny CPU runs: absolute tokens/s mean little; the sign of the speedup is compared):",
              render(df[show]), ""]
    paper = _paper_speedups()
    prow = [{"target": t, "eval_set": s, "concurrency": c, "speedup": f"{lo:.2f}" if lo == hi else f"{lo:.2f}-{hi:.2f}",
             "from": how} for (t, s, c), (lo, hi, how) in sorted(paper.items())]
    lines += ["Paper (1xH200 per target, vLLM):", render(pd.DataFrame(prow)), ""]
    lines.append("P-EAGLE (best K) >= EAGLE-3 (best K), per concurrency:")
    ours = [(int(r["concurrency"]), parse_cell(r["speedup_best"])) for r in df.to_dict("records")]
    for c in sorted({c for c, _ in ours} | {c for (_, _, c) in paper}):
        o = [v for cc, v in ours if cc == c and isinstance(v, float)]
        p = [(lo, hi) for (_, _, cc), (lo, hi, _) in paper.items() if cc == c]
        o_ge = sum(v >= 1 for v in o)
        p_ge = sum(lo >= 1 for lo, _ in p)  # a range counts as faster when its low end is
        o_txt = f"ours {o_ge}/{len(o)} rows" + (f" (speedups {', '.join(_fmt(v, 2) for v in o)})" if o else "")
        p_txt = f"paper {p_ge}/{len(p)} targets" if p else "no paper value"
        if not o:
            verdict = "not compared (no value in ours)"
        elif not p:
            verdict = "no paper value"
        else:
            verdict = "MATCH" if (2 * o_ge > len(o)) == (2 * p_ge > len(p)) else "DIFFERS"
        lines.append(f"- concurrency {c}: {o_txt}; {p_txt} -> {verdict} (majority direction)")
    return lines


# --------------------------------------------------------------------------- driver


def provenance_line(path: Path, current_digest: str | None, ablation_digest: str | None = None) -> str:
    """Which run made the table at ``path``, and whether it still describes the profile in effect.

    Stale: its config digest differs from ``current_digest`` (a setting changed since, or the
    table predates digests), or, for an ablation table, its ablation digest differs from
    ``ablation_digest`` (its rows' runs changed). Unknown when no digest is given.
    """
    try:
        prov = read_provenance(path)
    except ValueError as err:
        return f"Provenance: unreadable ({err})."
    if prov is None:
        return f"Provenance: none ({sidecar(path).name} missing)."
    digest, commit = prov.get("config_digest"), prov.get("commit") or "unknown commit"
    made = f"made at commit {str(commit)[:12]}" + (f" on {prov['created']}" if prov.get("created") else "")
    if current_digest is None:
        return f"Provenance: {made}, config digest {digest or 'not recorded'}."
    if digest is None:
        return f"Provenance: {made}, no config digest recorded -> STALE (predates digests; regenerate it)."
    if digest != current_digest:
        return (f"Provenance: {made}, config digest {digest} -> STALE (the profile's settings now digest to "
                f"{current_digest}; regenerate it)")
    if ablation_digest is not None and prov.get("ablation_digest") != ablation_digest:
        return (f"Provenance: {made}, config digest {digest}, ablation digest {prov.get('ablation_digest')} -> STALE "
                f"(the table's rows now digest to {ablation_digest}; regenerate it)")
    return f"Provenance: {made}, config digest {digest} -> current."


def compare_tables(tables_dir: str | Path = "paper_tables", current_digest: str | None = None,
                   only: list[str] | None = None, ablation_digests: dict[str, str] | None = None) -> str:
    """The comparison report (plain text, Markdown tables when ``tabulate`` is installed).

    ``current_digest``: the config digest of the profile in effect; each table is then marked
    current or stale (see :func:`provenance_line`), an ablation table also by its entry of
    ``ablation_digests`` (``peagle.tables.ablation_digest``). ``only``: these tables (default: all
    of TABLES).
    """
    tables_dir = Path(tables_dir)
    out = ["# Regenerated tables vs the paper (arXiv 2602.01469)", "",
           f"Tables directory: {tables_dir}. Paper numbers: peagle/resources/paper_numbers.csv. "
           "Only the qualitative shape is expected to agree.", ""]
    manifest = tables_dir / "manifest.json"
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
            out += [f"Recorded run: profile {m.get('profile')}, commit {str(m.get('commit'))[:12]}, config digest "
                    f"{m.get('config_digest')}, recorded {m.get('recorded_at')}, on {_machine(m.get('machine'))}; "
                    f"wall time {_fmt(m.get('wall_time_s'), 0)} s.", ""]
        except (json.JSONDecodeError, AttributeError):
            out += [f"{manifest}: unreadable; ignored.", ""]
    for name in only or TABLES:
        path = tables_dir / f"{name}.csv"
        if not path.exists():
            if only or name not in ABLATION_CLAIMS:  # the ablations have a report of their own
                out += [f"## {name}: {path} not found; skipped.", ""]
            continue
        try:
            df = _read_csv(path)
            if df.empty:
                out += [f"## {name}: {path} has no rows; skipped.", ""]
                continue
            if name == "table1":
                try:
                    prov = read_provenance(path)
                except ValueError:
                    prov = None
                section = compare_table1(df, prov)
            elif name == "table2":
                section = compare_table2(df)
            elif name == "table9":
                try:
                    prov9 = read_provenance(path)
                except ValueError:
                    prov9 = None
                section = compare_table9(df, prov9)
            elif name == "table10":
                section = compare_table10(df)
            elif name in ABLATION_CLAIMS:
                try:
                    prov_a = read_provenance(path)
                except ValueError:
                    prov_a = None
                section = compare_ablation(name, df, prov_a)
            else:
                section = compare_drafting_cost(df)
            out += section[:2] + [provenance_line(path, current_digest, (ablation_digests or {}).get(name)), ""] \
                + section[2:]
        except Exception as err:  # a malformed table is reported, never fatal
            out.append(f"## {name}: could not be compared ({type(err).__name__}: {err})")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _machine(info: Any) -> str:
    if not isinstance(info, dict):
        return "an unrecorded machine"
    parts = [f"{info.get('cpus')} CPUs" if info.get("cpus") else None,
             f"{info['memory_gib']} GiB" if info.get("memory_gib") else None, info.get("gpu"),
             f"torch {info['torch']}" if info.get("torch") else None]
    return ", ".join(p for p in parts if p) or "an unrecorded machine"
