"""``peagle compare-drafter``: your own EAGLE-3 / P-EAGLE drafter beside the recorded baselines.

A drafter this suite's DAG did not train (this suite's checkpoint format or the speculators one,
:mod:`peagle.speculators`) is checked against the target before any model loads
(:func:`preflight`), evaluated with the suite's own engine on the recorded baselines' settings
(Table 9's evaluation sets at ``table9.k``; the drafting-cost K sweep on ``drafting_cost.eval_set``)
and written as ``OUT.md`` (side-by-side tables), ``OUT.csv`` (+ provenance sidecar, the same numbers)
and ``OUT_al_vs_k.png``. Baselines are read from a ``peagle record`` directory (``manifest.json``,
``table9.csv`` + ``table9.provenance.json``, ``drafting_cost.csv``); missing ones are reported,
stale ones (another config digest) flagged. The paper's Table 9 is shown as a reference only.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peagle.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, drafter_format, read_config, verify_weights
from peagle.config import Config
from peagle.evaluate import EvaluationError, training_outcome
from peagle.io import atomic_path, atomic_write_text, read_json, sha256_file
from peagle.provenance import read_provenance, sidecar

Log = Callable[[str], None]
METHODS = {"eagle3": "EAGLE-3", "peagle": "P-EAGLE"}
CSV_COLUMNS = ["section", "eval_set", "k", "source", "drafter_layers", "acceptance_length",
               "per_position_acceptance", "draft_ms_per_round", "rounds", "prompts", "stale"]
# The config field behind each checked quantity, per checkpoint format (named in errors).
FIELDS = {
    "peagle": {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "aux": "eagle_aux_hidden_state_layer_ids",
               "mask": "mask_token_id", "k_train": "peagle.k_train"},
    "speculators": {"hidden_size": "transformer_layer_config.hidden_size",
                    "vocab_size": "transformer_layer_config.vocab_size", "aux": "eagle_aux_hidden_state_layer_ids",
                    "mask": "mask_token_id", "k_train": "speculators_config.proposal_methods[0].speculative_tokens"},
}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- pre-flight


def preflight(drafter: str | Path, target_json: str | Path, ks: list[int] = ()) -> dict[str, Any]:
    """Check a drafter against target.json before any model loads; returns what the report shows.

    ``drafter``: a checkpoint dir (either format) or a training run dir (summary.json + final/).
    ``ks``: explicitly requested K values, each <= the drafter's trained K (P-EAGLE). Errors name
    the file and the field.
    """
    from peagle.target import read_target_json

    given = Path(drafter)
    if not given.is_dir():
        raise CheckpointError(f"{given}: no such drafter directory")
    ddir, summary = training_outcome(given)
    if summary is not None and summary.get("status", "ok") != "ok":
        raise EvaluationError(f"{given / 'summary.json'}: training ended {summary['status']}; no drafter to compare")
    cfg_path = ddir / CONFIG_NAME
    if not cfg_path.exists() or not (ddir / WEIGHTS_NAME).exists():
        raise CheckpointError(
            f"{ddir}: not a drafter checkpoint: expected config.json and model.safetensors, in this suite's format "
            f"(config.json with a 'peagle.spec' block) or the speculators format (config.json with "
            f"'speculators_model_type')")
    cfg = read_config(ddir)
    fmt = drafter_format(cfg)
    fields = FIELDS[fmt]
    info = read_target_json(target_json)
    spec, meta = cfg["peagle"]["spec"], cfg["peagle"]
    where = f"{cfg_path}: "
    for key, mine, theirs in (("hidden_size", spec["hidden_size"], info["hidden_size"]),
                              ("vocab_size", spec["vocab_size"], info["vocab_size"])):
        if mine != theirs:
            raise EvaluationError(f"{where}{fields[key]}={mine} != the target's {key}={theirs} ({target_json}): "
                                  f"the drafter was made for another target")
    if list(spec["aux_layer_ids"]) != list(info["aux_layer_ids"]):
        raise EvaluationError(f"{where}{fields['aux']}={spec['aux_layer_ids']} != the target's aux_layer_ids="
                              f"{info['aux_layer_ids']} ({target_json}): trained on other target layers")
    parallel = bool(spec.get("parallel", True))
    if parallel and not 0 <= int(spec["mask_token_id"]) < info["vocab_size"]:
        raise EvaluationError(f"{where}{fields['mask']}={spec['mask_token_id']} outside the target's vocabulary "
                              f"[0, {info['vocab_size']})")
    k_train = meta.get("k_train") if parallel else None
    for k in ks:
        if type(k) is not int or k < 1:
            raise EvaluationError(f"K={k!r}: need an integer >= 1")
        if k_train is not None and k > k_train:
            raise EvaluationError(f"{where}K={k} exceeds the {k_train} depths this P-EAGLE drafter was trained for "
                                  f"({fields['k_train']}); compare with --k <= {k_train}")
    if fmt == "peagle":
        verify_weights(ddir, cfg)  # before any model loads
    return {
        "dir": str(ddir), "config": str(cfg_path), "format": fmt, "method": meta.get("method"),
        "kind": "P-EAGLE (parallel drafting)" if parallel else "EAGLE-3 (autoregressive)", "parallel": parallel,
        "k_train": k_train, "layers": spec["num_layers"], "hidden_size": spec["hidden_size"],
        "vocab_size": spec["vocab_size"], "weights_sha256": sha256_file(ddir / WEIGHTS_NAME),
        "trained_for": meta.get("verifier") or meta.get("target_name") or meta.get("target"),
        "target_json": str(target_json), "target_name": target_name(info, target_json),
    }


def target_name(info: dict[str, Any], target_json: str | Path) -> str:
    """The name the tables use for a target (as the drafting-cost stage derives it)."""
    return info.get("name") or Path(target_json).parent.name


# --------------------------------------------------------------------------- recorded baselines


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def read_recorded(recorded_dir: str | Path, cfg: Config, target: str) -> dict[str, Any]:
    """Baselines of ``target`` from a ``peagle record`` directory; never raises for missing files.

    Returns ``{"dir", "manifest", "stale", "notes", "table9": {(eval_set, method): cell},
    "sweep": {(method, k): row}}``; a cell/row has acceptance_length, per_position_acceptance,
    draft_ms_per_round, drafter_layers, rounds, prompts.
    """
    import pandas as pd

    root = Path(recorded_dir)
    out: dict[str, Any] = {"dir": str(root), "manifest": None, "stale": False, "notes": [], "table9": {}, "sweep": {}}
    digest = cfg.digest()
    if not (root / "manifest.json").exists():
        out["notes"].append(f"no recorded baselines: {root / 'manifest.json'} is missing (run `peagle record`)")
        return out
    try:
        manifest = read_json(root / "manifest.json")
    except ValueError as err:
        out["notes"].append(f"recorded baselines unreadable: {err}")
        return out
    out["manifest"] = manifest
    digests = {"manifest.json": manifest.get("config_digest")}

    t9 = root / "table9.csv"
    prov9 = sidecar(t9)
    prov = read_provenance(t9) if t9.exists() else None
    if prov is not None:
        digests[prov9.name] = prov.get("config_digest")
        spread = prov.get("seed_spread") or {}
        if (spread.get("n_seeds") or 1) > 1:
            out["notes"].append(f"recorded Table 9 has {spread['n_seeds']} seeds per cell ({spread.get('seeds')}); "
                                "the baselines here are the first seed's runs, as in the drafting-cost sweep "
                                "(one drafter per method, no spread)")
        for key, cell in (prov.get("cells") or {}).items():
            t, s, m = (key.split("/") + ["", "", ""])[:3]
            if "runs" in cell:  # one run per seed: the first seed's, as the drafting-cost sweep uses
                cell = next(iter(cell["runs"].values()), {})
            if t != target or (cell.get("status") or "ok") != "ok":
                continue
            rounds, draft_s = _num(cell.get("rounds")), _num(cell.get("draft_s"))
            out["table9"][(s, m)] = {
                "acceptance_length": _num(cell.get("acceptance_length")),
                "per_position_acceptance": cell.get("per_position_acceptance"),
                "draft_ms_per_round": 1000 * draft_s / rounds if rounds and draft_s is not None else None,
                "drafter_layers": cell.get("drafter_layers"), "rounds": cell.get("rounds"),
                "prompts": cell.get("prompts"),
            }
        if not out["table9"]:
            out["notes"].append(f"{prov9}: no Table 9 cells for target {target!r}")
    else:
        out["notes"].append(f"no recorded Table 9 ({t9} or its provenance is missing)")

    dc = root / "drafting_cost.csv"
    if dc.exists():
        df = pd.read_csv(dc)
        prov_dc = read_provenance(dc)
        if prov_dc is not None:
            digests[sidecar(dc).name] = prov_dc.get("config_digest")
        for r in df[df["target_name"].astype(str) == target].to_dict("records"):
            out["sweep"][(str(r["method"]), int(r["k"]))] = {
                "acceptance_length": _num(r.get("acceptance_length")), "per_position_acceptance": None,
                "draft_ms_per_round": _num(r.get("draft_ms_per_round")), "drafter_layers": r.get("drafter_layers"),
                "rounds": r.get("rounds"), "prompts": r.get("prompts")}
        if not out["sweep"]:
            out["notes"].append(f"{dc}: no drafting-cost rows for target {target!r}")
    else:
        out["notes"].append(f"no recorded drafting cost ({dc} is missing)")

    differ = {f: d for f, d in digests.items() if d is not None and d != digest}
    if differ:
        out["stale"] = True
        out["notes"].append(f"STALE baselines: config digest {sorted(set(differ.values()))} in "
                            f"{', '.join(sorted(differ))} != the current config's {digest}; re-run `peagle record`")
    return out


def paper_table9() -> dict[str, list[tuple[str, str, str]]]:
    """eval_set -> [(paper target, EAGLE-3 AL, P-EAGLE AL)] from the paper's Table 9."""
    from peagle.tables import paper_numbers

    p = paper_numbers()
    p = p[p["table"] == "table9"]
    vals = {(r.target, r.dataset, r.method): r.value for r in p.itertuples()}
    out: dict[str, list[tuple[str, str, str]]] = {}
    for t in dict.fromkeys(p["target"]):
        for s in dict.fromkeys(p["dataset"]):
            if (t, s, "eagle3") in vals or (t, s, "peagle") in vals:
                out.setdefault(s, []).append((t, vals.get((t, s, "eagle3"), "-"), vals.get((t, s, "peagle"), "-")))
    return out


# --------------------------------------------------------------------------- evaluation


def _from_eval(res: dict[str, Any]) -> dict[str, Any]:
    r = res.get("rounds") or 0
    return {"acceptance_length": res.get("acceptance_length"), "per_position_acceptance": res.get("per_position_acceptance"),
            "draft_ms_per_round": 1000 * res["draft_s"] / r if r else None, "drafter_layers": res.get("drafter_layers"),
            "rounds": res.get("rounds"), "prompts": res.get("prompts")}


def vllm_available(cfg: Config) -> bool:
    p = Path(cfg.vllm.python)
    return p.is_file() and os.access(p, os.X_OK)


def _vllm_eval(cfg: Config, config_files: list[str], target_json: Path, ddir: Path, prompts: Path, k: int,
               engine: dict[str, Any], log: Log) -> dict[str, Any] | None:
    """One ``peagle vllm-eval`` in the vLLM env (a subprocess with the repo on PYTHONPATH); None on failure."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="peagle-compare-vllm-") as work:
        work = Path(work)
        (work / "engine.json").write_text(json.dumps(engine))
        cmd = [cfg.vllm.python, "-m", "peagle", "vllm-eval", *[a for f in config_files for a in ("--config", f)],
               "--target", str(target_json), "--drafter", str(ddir), "--prompts", str(prompts), "--k", str(k),
               "--engine-result", str(work / "engine.json"), "--out", str(work / "vllm.json")]
        env = {**os.environ, "PYTHONPATH": str(repo)}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            log(f"vLLM check failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:] or ''}")
            return None
        return json.loads((work / "vllm.json").read_text())


def evaluate_all(cfg: Config, drafter: dict[str, Any], data_dir: str | Path, k: int, sweep_ks: list[int], *,
                 progress: bool, vllm: bool, config_files: list[str], log: Log) -> dict[str, Any]:
    """Table 9 cells (one per evaluation set at ``k``) and the K sweep of ``drafter`` (from :func:`preflight`)."""
    from peagle.bench.drafting_cost import drafting_cost
    from peagle.evaluate import evaluate_drafter

    data_dir, ddir, tj = Path(data_dir), Path(drafter["dir"]), Path(drafter["target_json"])
    sets = list(cfg.table9.eval_sets)
    dc = cfg.drafting_cost
    prompts = {s: data_dir / f"eval_{s}.jsonl" for s in dict.fromkeys(sets + [dc.eval_set])}
    for p in prompts.values():
        if not p.exists():
            raise FileNotFoundError(f"{p}: evaluation prompts missing (the data stage writes them)")
    table9, vllm_al = {}, {}
    for s in sets:
        res = evaluate_drafter(cfg, tj, ddir, prompts[s], k, progress=progress, log=log)
        table9[s] = _from_eval(res)
        if vllm:
            v = _vllm_eval(cfg, config_files, tj, ddir, prompts[s], k, res, log)
            if v is not None:
                vllm_al[s] = v.get("acceptance_length")
    sweep = {}
    if sweep_ks:
        df = drafting_cost(cfg, tj, [ddir], prompts[dc.eval_set], sweep_ks, dc.n_prompts, dc.max_new_tokens,
                           progress=progress, log=log)
        for r in df.to_dict("records"):
            sweep[int(r["k"])] = {"acceptance_length": _num(r["acceptance_length"]), "per_position_acceptance": None,
                                  "draft_ms_per_round": _num(r["draft_ms_per_round"]),
                                  "drafter_layers": r["drafter_layers"], "rounds": r["rounds"], "prompts": r["prompts"]}
    return {"table9": table9, "sweep": sweep, "vllm": vllm_al}


# --------------------------------------------------------------------------- report


def _fmt(v: Any, nd: int = 3) -> str:
    f = _num(v)
    return "-" if f is None else f"{f:.{nd}f}"


def _fmt_pos(v: Any) -> str:
    return "-" if not v else " / ".join(_fmt(x, 2) for x in v)


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]


def _rows(name: str, res: dict[str, Any], rec: dict[str, Any], sets: list[str], k: int, sweep_ks: list[int],
          stale: bool) -> list[dict[str, Any]]:
    """The report's numbers in long form (one row per section x set x K x source): the CSV."""
    rows = []

    def add(section, s, kk, source, cell):
        if cell:
            rows.append({"section": section, "eval_set": s, "k": kk, "source": source,
                         "drafter_layers": cell.get("drafter_layers"),
                         "acceptance_length": _num(cell.get("acceptance_length")),
                         "per_position_acceptance": json.dumps(cell.get("per_position_acceptance"))
                         if cell.get("per_position_acceptance") else None,
                         "draft_ms_per_round": _num(cell.get("draft_ms_per_round")), "rounds": cell.get("rounds"),
                         "prompts": cell.get("prompts"), "stale": stale if source != name else None})

    for s in sets:
        add("table9", s, k, name, res["table9"].get(s))
        if s in res["vllm"]:
            add("table9", s, k, f"{name} (vLLM)", {"acceptance_length": res["vllm"][s]})
        for m in METHODS:
            add("table9", s, k, f"recorded {m}", rec["table9"].get((s, m)))
    for kk in sorted(set(sweep_ks) | {kk for (_, kk) in rec["sweep"]}):
        add("k_sweep", None, kk, name, res["sweep"].get(kk))
        for m in METHODS:
            add("k_sweep", None, kk, f"recorded {m}", rec["sweep"].get((m, kk)))
    return rows


def render_report(name: str, drafter: dict[str, Any], cfg: Config, rec: dict[str, Any], res: dict[str, Any],
                  k: int, sweep_ks: list[int], notes: list[str], figure: str) -> str:
    man = rec.get("manifest") or {}
    lines = [f"# Compare drafter: {name}", "",
             (f"- drafter: `{drafter['dir']}` ({drafter['format']} format), {drafter['kind']}, "
              f"{drafter['layers']} layer(s), trained K (k_train): {drafter['k_train'] or 'any (autoregressive)'}"),
             f"- weights sha256: `{drafter['weights_sha256']}`; trained for: {drafter['trained_for'] or 'unknown'}",
             f"- target: {drafter['target_name']} (`{drafter['target_json']}`)",
             f"- current config: profile {cfg.profile}, digest `{cfg.digest()}`",
             f"- baselines: `{rec['dir']}`" + (f", profile {man.get('profile')}, commit `{man.get('commit')}`, "
                                               f"config digest `{man.get('config_digest')}`" if man else " (none)")
             + (" -- **STALE** (recorded under another config)" if rec["stale"] else ""), ""]
    lines += [(f"## Table 9 settings: K={k}, eval.n_prompts={cfg.eval.n_prompts}, "
               f"eval.max_new_tokens={cfg.eval.max_new_tokens}"), ""]
    paper = paper_table9()
    for s in cfg.table9.eval_sets:
        rows = []
        for label, cell in [(f"**{name}** (yours)", res["table9"].get(s))] + \
                [(f"recorded {METHODS[m]}", rec["table9"].get((s, m))) for m in METHODS]:
            if cell is None:
                rows.append([label, "missing", "-", "-", "-"])
            else:
                rows.append([label, _fmt(cell.get("acceptance_length")), _fmt_pos(cell.get("per_position_acceptance")),
                             _fmt(cell.get("draft_ms_per_round"), 2), str(cell.get("drafter_layers") or "-")])
        if s in res["vllm"]:
            rows.insert(1, [f"{name} in vLLM", _fmt(res["vllm"][s]), "-", "-", "-"])
        lines += [f"### {s}", ""] + _md_table(
            ["drafter", "acceptance length", "per-position acceptance", "drafting ms/round", "layers"], rows)
        ref = paper.get(s, [])
        if ref:
            lines += [f"Paper Table 9 ({s}, K=5, much larger targets; reference only): "
                      + "; ".join(f"{t}: EAGLE-3 {e3}, P-EAGLE {pe}" for t, e3, pe in ref), ""]
    ks = sorted(set(sweep_ks) | {kk for (_, kk) in rec["sweep"]})
    lines += [(f"## Acceptance length and drafting time vs K ({cfg.drafting_cost.eval_set}, "
               f"drafting_cost.n_prompts={cfg.drafting_cost.n_prompts}, "
               f"max_new_tokens={cfg.drafting_cost.max_new_tokens})"), ""]
    rows = []
    for kk in ks:
        cells = [res["sweep"].get(kk)] + [rec["sweep"].get((m, kk)) for m in METHODS]
        rows.append([str(kk)] + [f"{_fmt(c.get('acceptance_length'))} / {_fmt(c.get('draft_ms_per_round'), 2)}"
                                 if c else "-" for c in cells])
    lines += _md_table(["K", f"{name}: AL / draft ms", "recorded EAGLE-3: AL / draft ms",
                        "recorded P-EAGLE: AL / draft ms"], rows) if rows else ["(no K values)", ""]
    lines += [f"![acceptance length vs K]({figure})", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def plot_al_vs_k(out: Path, name: str, res: dict[str, Any], rec: dict[str, Any]) -> Path:
    """Acceptance length against K: yours vs the recorded baselines (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    series = [(f"{name} (yours)", {k: c["acceptance_length"] for k, c in res["sweep"].items()}, "o-")]
    series += [(f"recorded {METHODS[m]}", {k: c["acceptance_length"] for (mm, k), c in rec["sweep"].items() if mm == m},
                "s--") for m in METHODS]
    for label, pts, style in series:
        pts = {k: v for k, v in pts.items() if v is not None}
        if pts:
            ks = sorted(pts)
            ax.plot(ks, [pts[k] for k in ks], style, label=label)
    ticks = sorted({k for line in ax.lines for k in line.get_xdata()})
    if ticks:
        ax.set_xticks(ticks)
    ax.set_xlabel("K (speculative tokens)")
    ax.set_ylabel("acceptance length")
    ax.set_title("Acceptance length vs K")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return out


def output_paths(out_md: str | Path) -> dict[str, Path]:
    out = Path(out_md)
    return {"md": out, "csv": out.with_suffix(".csv"), "png": out.with_name(out.stem + "_al_vs_k.png")}


def compare_drafter(cfg: Config, drafter: str | Path, target_json: str | Path, data_dir: str | Path,
                    recorded_dir: str | Path, out_md: str | Path, *, name: str | None = None,
                    k: int | None = None, vllm: bool | None = None, config_files: list[str] | None = None,
                    progress: bool = True, log: Log = _stderr) -> dict[str, Any]:
    """Pre-flight, evaluate and report (see the module docstring); returns the paths and numbers.

    ``k``: the Table 9 comparison depth (default ``table9.k``; must be <= a P-EAGLE drafter's
    k_train). ``vllm``: also evaluate in vLLM (None: when ``vllm.python`` exists).
    """
    import pandas as pd

    from peagle.provenance import write_table

    k = cfg.table9.k if k is None else k
    info = preflight(drafter, target_json, [k])
    name = name or (Path(info["dir"]).parent.name if Path(info["dir"]).name == "final" else Path(info["dir"]).name)
    notes = []
    sweep_ks = [kk for kk in cfg.drafting_cost.ks if info["k_train"] is None or kk <= info["k_train"]]
    skipped = [kk for kk in cfg.drafting_cost.ks if kk not in sweep_ks]
    if skipped:
        notes.append(f"K={skipped} of drafting_cost.ks skipped: above this drafter's k_train={info['k_train']}")
    rec = read_recorded(recorded_dir, cfg, info["target_name"])
    notes += rec["notes"]
    use_vllm = vllm_available(cfg) if vllm is None else vllm
    if use_vllm and not vllm_available(cfg):
        notes.append(f"vLLM check skipped: {cfg.vllm.python} is not an executable (vllm.python)")
        use_vllm = False
    elif use_vllm and info["format"] == "speculators":
        notes.append("vLLM check skipped: peagle vllm-eval pre-flights this suite's export format only")
        use_vllm = False
    elif not use_vllm:
        notes.append("vLLM check not run" + ("" if vllm is False else f" ({cfg.vllm.python} not found)"))
    log(f"compare-drafter {name}: {info['kind']}, {info['format']} format, k_train {info['k_train']}; "
        f"Table 9 at K={k} on {list(cfg.table9.eval_sets)}, sweep K={sweep_ks}")
    res = evaluate_all(cfg, info, data_dir, k, sweep_ks, progress=progress, vllm=use_vllm,
                       config_files=list(config_files or []), log=log)

    paths = output_paths(out_md)
    rows = _rows(name, res, rec, list(cfg.table9.eval_sets), k, sweep_ks, rec["stale"])
    df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    for col in ("k", "drafter_layers", "rounds", "prompts"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    man = rec.get("manifest") or {}
    write_table(df, paths["csv"], table="compare_drafter", cfg=cfg, config_files=config_files,
                what=f"drafter {name} vs the recorded EAGLE-3 / P-EAGLE baselines of {info['target_name']}",
                drafter=info, baselines={"dir": rec["dir"], "commit": man.get("commit"),
                                         "config_digest": man.get("config_digest"), "stale": rec["stale"]},
                setting={"k": k, "eval_sets": list(cfg.table9.eval_sets), "sweep_ks": sweep_ks,
                         "sweep_eval_set": cfg.drafting_cost.eval_set}, notes=notes)
    plot_al_vs_k(paths["png"], name, res, rec)
    text = render_report(name, info, cfg, rec, res, k, sweep_ks, notes, paths["png"].name)
    atomic_write_text(paths["md"], text + "\n")
    return {"paths": {key: str(p) for key, p in paths.items()}, "drafter": info, "results": res, "recorded": rec,
            "notes": notes, "name": name}
