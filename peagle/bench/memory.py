"""Memory scaling: peak training memory and step time vs context length and partitions S.

Every configuration (mask strategy x context length x S) runs in its own subprocess
(``python -m peagle.bench.memory --child SPEC``), so peaks never mix and a crash or timeout
cannot take the parent with it. The child builds a drafter of
the configured architecture (width ``--hidden-size``, default the target's), one synthetic
example of the context length (random token ids and hidden states -- memory and time depend on
shapes only; COD sampled with the training retention at depth ``scaling.memory_k``) and runs
``repeats`` full training steps: mask retrieval/construction, forward, backward (segment by
segment through ``peagle.partition.partitioned_backward`` when S > 1), optimizer step. It
reports the last step's time and the peak memory over all steps, measured as training runs
measure it (``peagle.memory.metered``, the same figure as ``peak_mem_mb`` of a Table 1 cell): on
CPU the live-tensor accountant (weights + LM head + live tensors; ``baseline_mb`` = weights +
head), on CUDA ``torch.cuda.max_memory_allocated`` (``baseline_mb`` = allocated once the drafter
exists). Going past the budget is recorded as ``OOM``.

Strategies are looked up by name in ``peagle.example.MaskBuilder``; names it does not know and
S > 1 without ``peagle.partition`` are skipped (and logged), never faked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# No torch at module level: the CLI imports this module to build its parser.
MB = 2**20
CHILD_PREFIX = "MEMORY_SCALING_RESULT "


# --------------------------------------------------------------------------- child


def _config_from(spec: dict[str, Any]):
    from peagle.config import load_config

    return load_config(*spec["config_files"])


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in this process; returns its result row (see module doc).

    spec: config_files, strategy, ctx, partitions, k, device, hidden_size, budget_mb, repeats.
    """
    import torch

    from peagle import memory
    from peagle.bench.common import bench_drafter, sync
    from peagle.cod import cod_sample
    from peagle.example import MaskBuilder, build_example
    from peagle.step import parallel_backward

    cfg = _config_from(spec)
    tc = cfg.train
    torch.set_num_threads(cfg.runtime.threads)
    device = torch.device(spec["device"])
    dtype = getattr(torch, cfg.runtime.dtype)
    ctx, k, S, h = spec["ctx"], spec["k"], spec["partitions"], spec["hidden_size"]
    n = ctx - 1
    vocab = cfg.target.vocab_size
    mask_token = vocab - 1
    drafter, head = bench_drafter(cfg, h, vocab, mask_token, ctx + k, device, dtype, seed=tc.seed)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    g = torch.Generator().manual_seed(tc.seed)
    rows = {"input_ids": torch.randint(0, vocab - 1, (n,), generator=g),
            "aux_hidden": torch.randn(n, 3 * h, generator=g),
            "target_hidden": torch.randn(n, h, generator=g),
            "loss_mask": torch.ones(n, dtype=torch.uint8)}
    layout = cod_sample(n, k, tc.retention, tc.retention_min, generator=g)
    head_bytes = head.numel() * head.element_size()
    _, needed = memory.model_bytes(drafter.parameters())
    resident = memory.tensor_bytes([*drafter.parameters(), head])
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else resident
    row: dict[str, Any] = {"elements": len(layout), "baseline_mb": baseline / MB,
                           "params_m": sum(p.numel() for p in drafter.parameters()) / 1e6}
    step_s = []
    peak: int | None = None
    try:
        with memory.metered(spec["budget_mb"], device, resident_bytes=resident,
                            required_bytes=needed + head_bytes) as meter:
            builder = MaskBuilder(spec["strategy"], n, k)  # its precomputation counts too
            for _ in range(spec["repeats"]):
                sync(device)
                t0 = time.perf_counter()
                ex = build_example(rows, layout, mask_token)
                parallel_backward(drafter, head, ex, lambda lay: builder(lay, n), S, tc.loss, k)
                torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                step_s.append(time.perf_counter() - t0)
                del ex
            peak = meter.peak_bytes()
        row.update(status="ok", memory_measure=meter.measure)
    except memory.BudgetExceeded as err:  # past the budget, or (CUDA, no budget) the device is full
        peak = err.peak_bytes
        row.update(status="OOM", error=err.error, memory_measure=err.measure)
    row.update(peak_mb=None if peak is None else peak / MB,
               peak_over_baseline_mb=None if peak is None else (peak - baseline) / MB,
               step_s=step_s[-1] if step_s and row["status"] == "ok" else None, steps_run=len(step_s))
    return row


# --------------------------------------------------------------------------- parent


def configurations(cfg, strategies: list[str], with_partitions: bool, contexts: list[int] | None = None,
                   partitions: list[int] | None = None, partition_ctx: int | None = None) -> list[dict[str, Any]]:
    """The sweep: every strategy x context (S = 1), then every strategy x S at the partition
    context; a configuration in both sweeps is measured once. ``contexts``, ``partitions`` and
    ``partition_ctx`` override the ``scaling.memory_*`` lists."""
    sc = cfg.scaling
    contexts = sc.memory_contexts if contexts is None else contexts
    partitions = sc.memory_partitions if partitions is None else partitions
    pctx = sc.memory_partition_ctx if partition_ctx is None else partition_ctx
    seen, out = set(), []
    for sweep, pairs in (("context", [(c, 1) for c in contexts]), ("partitions", [(pctx, s) for s in partitions])):
        if sweep == "partitions" and not with_partitions:
            pairs = [(c, s) for c, s in pairs if s == 1]
        for strategy in strategies:
            for ctx, s in pairs:
                key = (strategy, ctx, s)
                if key in seen:
                    continue
                seen.add(key)
                out.append({"sweep": sweep, "strategy": strategy, "ctx": ctx, "partitions": s})
    return out


def _run_child(spec: dict[str, Any], threads: int, timeout_s: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(root)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "peagle.bench.memory", "--child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "TIMEOUT", "error": f"no result within {timeout_s} s", "wall_s": time.perf_counter() - t0}
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_PREFIX):
            return {**json.loads(line[len(CHILD_PREFIX):]), "wall_s": time.perf_counter() - t0}
    # No result: the process died (e.g. killed by the kernel) or failed outright.
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {"status": "CRASH", "error": f"exit {proc.returncode}: {' | '.join(tail)}"[:500],
            "wall_s": time.perf_counter() - t0}


def run_sweep(cfg, out: str | Path, *, config_files: list[str], device: str | None = None,
              hidden_size: int | None = None, budget_mb: int | None = None, figure: str | None = None,
              timeout_s: int = 600, repeats: int = 2, strategies: list[str] | None = None,
              contexts: list[int] | None = None, partitions: list[int] | None = None,
              partition_ctx: int | None = None, log=lambda m: None):
    """Measure every configuration in its own subprocess; write ``out`` (CSV) + provenance.

    The CSV is rewritten after every configuration, so a sweep cut short keeps what it measured.
    ``strategies``/``contexts``/``partitions``/``partition_ctx`` override the profile's lists.
    """
    import torch

    from peagle.bench.common import available_strategies
    from peagle.io import atomic_write_text
    from peagle.provenance import write_table

    sc = cfg.scaling
    device = device or cfg.runtime.device
    hidden_size = hidden_size or cfg.target.hidden_size
    if budget_mb is None:
        budget_mb = sc.memory_budget_mb if sc.memory_budget_mb is not None else cfg.train.memory_budget_mb
    strategies, missing = available_strategies(list(strategies or sc.memory_strategies), 64, sc.memory_k)
    import importlib.util

    with_partitions = importlib.util.find_spec("peagle.partition") is not None
    if missing:
        log(f"mask strategies not available in this build, skipped: {', '.join(missing)}")
    if not with_partitions:
        log("peagle.partition is not available: the S > 1 configurations are skipped")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = Path(out)
    rows = []
    for conf in configurations(cfg, strategies, with_partitions, contexts, partitions, partition_ctx):
        spec = {**conf, "config_files": list(config_files), "k": sc.memory_k, "device": device,
                "hidden_size": hidden_size, "budget_mb": budget_mb, "repeats": repeats}
        res = _run_child(spec, cfg.runtime.threads, timeout_s)
        row = {**conf, "k": sc.memory_k, "hidden_size": hidden_size, "device": device, "budget_mb": budget_mb,
               **{key: res.get(key) for key in ("status", "elements", "peak_mb", "baseline_mb",
                                                 "peak_over_baseline_mb", "memory_measure", "step_s",
                                                 "steps_run", "wall_s", "error")}}
        step = f"{row['step_s']:.3f} s/step" if row["step_s"] is not None else "-"
        peak = f"{row['peak_mb']:.0f} MB peak" if row["peak_mb"] is not None else "-"
        log(f"{conf['strategy']:>9} ctx={conf['ctx']:>6} S={conf['partitions']}: {row['status']:<7} {peak}, {step}")
        rows.append(row)
        df = _frame(rows)
        atomic_write_text(out, df.to_csv(index=False))
    write_table(df, out, table="memory_scaling", cfg=cfg, config_files=list(config_files), **{
        "what": "peak training memory and step time vs context length (S = 1) and vs partitions S",
        "method": {
            "isolation": "one subprocess per configuration (python -m peagle.bench.memory --child SPEC)",
            "memory": ("peagle.memory.metered, as training runs: CPU: live-tensor accountant (weights + LM "
                       "head + bytes of live tensor storages, deterministic; baseline_mb = weights + head); "
                       "CUDA: torch.cuda.max_memory_allocated (baseline_mb: allocated once the drafter exists)"),
            "step": (f"{repeats} training steps (mask, forward, backward, AdamW step) on one synthetic example; "
                     "step_s is the last one"),
            "budget": ("CPU: live bytes past the budget = OOM (accountant); CUDA: allocation failure under "
                       "the memory fraction = OOM"),
            "data": "random token ids and hidden states; COD sample with train.retention at depth scaling.memory_k",
            "drafter": "configured architecture at hidden_size, random weights",
        },
        "strategies_skipped": missing,
        "partitions_available": with_partitions,
        "started": started,
        "host": {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
                 "threads": cfg.runtime.threads},
    })
    if figure:
        plot(df, Path(figure))
    return df


def _frame(rows: list[dict[str, Any]]):
    import pandas as pd

    df = pd.DataFrame(rows)
    for col in ("peak_mb", "baseline_mb", "peak_over_baseline_mb", "wall_s"):
        df[col] = pd.to_numeric(df[col]).round(1)
    df["step_s"] = pd.to_numeric(df["step_s"]).round(4)
    return df


def plot(df, out_base: Path) -> list[Path]:
    """Peak memory and step time vs context length (S = 1) and vs S; OOM cells marked x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    has_s = bool((df["partitions"] > 1).any())
    fig, axes = plt.subplots(2 if has_s else 1, 2, figsize=(11, 7.5 if has_s else 3.9), squeeze=False)
    ctx_rows = df[(df["sweep"] == "context") | ((df["partitions"] == 1) & df["ctx"].isin(
        df.loc[df["sweep"] == "context", "ctx"]))]
    ctx_rows = ctx_rows[ctx_rows["partitions"] == 1]
    panels = [(axes[0], ctx_rows, "ctx", "training context length (tokens)")]
    if has_s:
        pctx = int(df.loc[df["partitions"] > 1, "ctx"].iloc[0])
        panels.append((axes[1], df[df["ctx"] == pctx], "partitions", f"partitions S (context {pctx})"))
    palette = dict(zip(sorted(df["strategy"].unique()), sns.color_palette("deep")))
    markers = dict(zip(sorted(df["strategy"].unique()), "osD^v"))
    # Failed cells of different strategies share an x: spread them a little (log-2 axis).
    shift = {s: 2 ** (0.07 * (i - (len(palette) - 1) / 2)) for i, s in enumerate(sorted(palette))}
    budget = df["budget_mb"].dropna()
    for (ax_mem, ax_time), data, x, xlabel in panels:
        for strategy, part in data.groupby("strategy"):
            part = part.sort_values(x)
            ok = part[part["status"] == "ok"]
            bad = part[part["status"] != "ok"]
            color, marker = palette[strategy], markers[strategy]
            ax_mem.plot(ok[x], ok["peak_mb"], marker=marker, color=color, label=strategy)
            ax_time.plot(ok[x], ok["step_s"], marker=marker, color=color, label=strategy)
            if len(bad):
                # Failed cells have no meaningful peak: mark them along the top of the panel.
                top = matplotlib.transforms.blended_transform_factory(ax_mem.transData, ax_mem.transAxes)
                ax_mem.scatter(bad[x] * shift[strategy], [0.95] * len(bad), marker="x", s=80, color=color, transform=top,
                               clip_on=False, label=f"{strategy}: " + "/".join(sorted(bad["status"].unique())))
        if len(budget):
            ax_mem.axhline(float(budget.iloc[0]), color="crimson", ls="--", lw=1, label="budget")
        for ax in (ax_mem, ax_time):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_xticks(sorted(data[x].unique()), [str(v) for v in sorted(data[x].unique())])
            ax.minorticks_off()
            vals = (data["peak_mb"] if ax is ax_mem else data["step_s"])[data["status"] == "ok"].dropna()
            if len(vals) and vals.max() / max(vals.min(), 1e-9) > 20:
                ax.set_yscale("log")
            else:
                top = (vals.max() * 1.25) if len(vals) else 1.0
                if ax is ax_mem and len(budget):
                    top = max(top, float(budget.iloc[0]) * 1.1)  # keep the budget line in view
                ax.set_ylim(bottom=0, top=top)
        ax_mem.set_ylabel("peak memory (MB)")
        ax_time.set_ylabel("time per training step (s)")
        ax_mem.legend(fontsize=8, loc="lower left" if x == "partitions" else "center left")
    dev = df["device"].iloc[0]
    fig.suptitle(f"Training memory and step time ({dev}, width {df['hidden_size'].iloc[0]}, K = {df['k'].iloc[0]}); "
                 "x = failed (OOM / timeout), drawn at the top")
    fig.tight_layout()
    out_base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out_base.with_suffix(f".{ext}")
        tmp = path.with_name(path.stem + ".tmp." + ext)
        fig.savefig(tmp, dpi=160, bbox_inches="tight")
        tmp.replace(path)
        paths.append(path)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``--child SPEC``: measure one configuration (internal); otherwise run the sweep."""
    p = argparse.ArgumentParser(prog="python -m peagle.bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", action="append", help="profile YAML (repeat for overlays)")
    p.add_argument("--out", help="CSV path")
    p.add_argument("--device")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--budget-mb", type=int)
    p.add_argument("--figure")
    p.add_argument("--timeout", type=int, default=600)
    add_overrides(p)
    args = p.parse_args(argv)
    if args.child:
        row = measure(json.loads(args.child))
        print(CHILD_PREFIX + json.dumps(row), flush=True)
        return 0
    if not args.config or not args.out:
        p.error("--config and --out are required (or use `python -m peagle memory-scaling`)")
    from peagle.config import load_config

    cfg = load_config(*args.config)
    run_sweep(cfg, args.out, config_files=args.config, device=args.device, hidden_size=args.hidden_size,
              budget_mb=args.budget_mb, figure=args.figure, timeout_s=args.timeout, **overrides(args),
              log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def add_overrides(p: argparse.ArgumentParser) -> None:
    """Options that subset the profile's sweep (e.g. a GPU run that skips slow host-side cells)."""
    p.add_argument("--strategies", nargs="+", help="mask strategies (default scaling.memory_strategies)")
    p.add_argument("--contexts", nargs="+", type=int, help="context lengths (default scaling.memory_contexts)")
    p.add_argument("--partitions", nargs="+", type=int, help="S values (default scaling.memory_partitions)")
    p.add_argument("--partition-ctx", type=int, help="context of the S sweep (default scaling.memory_partition_ctx)")
    p.add_argument("--repeats", type=int, default=2, help="training steps per configuration (the last is timed)")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"strategies": args.strategies, "contexts": args.contexts, "partitions": args.partitions,
            "partition_ctx": args.partition_ctx, "repeats": args.repeats}


if __name__ == "__main__":
    sys.exit(main())
