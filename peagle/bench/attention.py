"""CPU benchmark: dense amortized mask vs mask-free attention in one drafter training step.

For each sequence length n (rows) and strategy, a fresh subprocess builds a drafter of the
tiny profile's width (H=256, 4 heads, 4 layers, intermediate 768, vocabulary 2048, float32),
COD-samples one super-sequence (K depths, retention r), and runs full training steps
(mask for the example, ``example_loss`` forward with the KL loss, backward) exactly as
``peagle.train`` does.

Memory: the process's peak resident set (Linux ``VmHWM``). After the model and the example's
inputs are built, the high-water mark is reset (``/proc/self/clear_refs`` = 5) and the current
RSS recorded as the base; ``peak_mb`` = the high-water mark after the mask setup and all steps,
minus that base. It therefore counts everything the strategy needs beyond the model and data:
the amortized grid (resident for the whole run in training), the per-example mask, SDPA's
copies of it, activations and gradients. RSS (not tracemalloc, which does not see torch's C++
allocations) is sound here because every configuration runs alone in its own process; freed
memory glibc keeps only lowers later growth, never the reported peak. Each worker runs under
an address-space cap (``peagle.memory.cap_memory``) so an over-large configuration fails with a
recorded "OOM" instead of endangering the machine.

Time: wall time of forward+backward per step (mask lookup included), median over the timed
steps after one untimed warm-up step (warm-up skipped when ``--steps 1``).

Usage: ``python -m peagle.bench.attention [--ns 2048 8192] [--out results/benchmarks/attention_cpu.csv]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MB = 2**20
STRATEGIES = ("amortized", "maskfree")
FIELDS = ["n", "k", "retention", "elements", "strategy", "status", "threads", "steps", "step_s_median",
          "step_s_all", "mask_setup_s", "base_rss_mb", "peak_mb", "peak_rss_mb", "mem_ratio_dense_over_maskfree",
          "time_ratio_maskfree_over_dense", "loadavg_1m_start", "loadavg_1m_end", "torch", "machine", "error"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def worker(n: int, k: int, retention: float, strategy: str, steps: int, seed: int, threads: int,
           budget_mb: int) -> dict:
    """One configuration in this (fresh) process -> result row."""
    from peagle import memory
    from peagle.cod import cod_sample
    from peagle.drafters import DrafterSpec, build_drafter
    from peagle.example import MaskBuilder, build_example
    from peagle.step import parallel_backward

    torch.set_num_threads(threads)
    h, vocab = 256, 2048
    spec = DrafterSpec(hidden_size=h, vocab_size=vocab, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64,
                       intermediate_size=768, mask_token_id=vocab - 1, aux_layer_ids=[1, 2, 3],
                       max_position_embeddings=n + k)
    drafter = build_drafter(spec, seed=seed)
    drafter.lm_head.weight.requires_grad_(False)  # frozen as in the tiny profile
    gen = torch.Generator().manual_seed(seed)
    layout = cod_sample(n, k, retention, generator=gen)
    rows = {"input_ids": torch.randint(0, vocab - 1, (n,), generator=gen),
            "aux_hidden": torch.randn(n, 3 * h, generator=gen),
            "target_hidden": torch.randn(n, h, generator=gen),
            "loss_mask": torch.ones(n, dtype=torch.uint8)}
    ex = build_example(rows, layout, spec.mask_token_id)
    head = drafter.lm_head.weight.detach().clone()
    row = {"n": n, "k": k, "retention": retention, "elements": len(layout), "strategy": strategy,
           "threads": threads, "steps": steps}
    memory.cap_memory(budget_mb, "cpu")
    if not _reset_peak():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); Linux needed")
    base = _status_kb("VmRSS") * 1024
    row["base_rss_mb"] = base / MB
    # Other processes on the machine slow both strategies; the load average says how much.
    row["loadavg_1m_start"] = os.getloadavg()[0]
    times = []
    try:
        t0 = time.perf_counter()
        builder = MaskBuilder(strategy, n, k)  # the amortized grid is built once per run
        row["mask_setup_s"] = time.perf_counter() - t0
        for i in range(steps + (1 if steps > 1 else 0)):
            t0 = time.perf_counter()
            parallel_backward(drafter, head, ex, lambda lay: builder(lay, n), 1, "kl", k)
            dt = time.perf_counter() - t0
            drafter.zero_grad(set_to_none=True)
            if steps == 1 or i > 0:
                times.append(dt)
        row["status"] = "ok"
    except Exception as err:  # noqa: BLE001 -- an OOM is a result, anything else is re-raised
        if not memory.is_oom(err):
            raise
        row["status"] = "OOM"
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]} (cap {budget_mb} MB)"
    row["loadavg_1m_end"] = os.getloadavg()[0]
    peak = _status_kb("VmHWM") * 1024
    row["peak_rss_mb"] = peak / MB
    row["peak_mb"] = (peak - base) / MB
    if times:
        row["step_s_median"] = statistics.median(times)
        row["step_s_all"] = " ".join(f"{t:.3f}" for t in times)
    return row


def _available_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 8192


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", type=int, nargs="+", default=[2048, 8192], help="rows per sequence")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--retention", type=float, default=0.8)
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3 for n<=2048, else 1)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--budget-mb", type=int, default=None,
                   help="address-space cap per worker (default 85%% of MemAvailable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/benchmarks/attention_cpu.csv")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        row = worker(a.n, a.k, a.retention, a.strategy, a.steps, a.seed, a.threads, a.budget_mb)
        print("RESULT " + json.dumps(row), flush=True)
        return 0

    budget = a.budget_mb or int(0.85 * _available_mb())
    rows = []
    for n in a.ns:
        steps = a.steps or (3 if n <= 2048 else 1)
        by_strategy = {}
        for strategy in a.strategies:
            cmd = [sys.executable, "-m", "peagle.bench.attention", "--worker", "--n", str(n), "--k", str(a.k),
                   "--retention", str(a.retention), "--strategy", strategy, "--steps", str(steps),
                   "--threads", str(a.threads), "--budget-mb", str(budget), "--seed", str(a.seed)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                row = {"n": n, "k": a.k, "retention": a.retention, "strategy": strategy, "status": "failed",
                       "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
            else:
                row = json.loads(lines[-1][len("RESULT "):])
            row.update(torch=torch.__version__, machine=f"{platform.machine()} {platform.processor() or ''}".strip())
            by_strategy[strategy] = row
            rows.append(row)
            print(json.dumps(row), flush=True)
        dense, free = by_strategy.get("amortized"), by_strategy.get("maskfree")
        if dense and free and free.get("status") == "ok":
            # An OOM dense run's peak is a lower bound of what it needed.
            if dense.get("peak_mb"):
                free["mem_ratio_dense_over_maskfree"] = dense["peak_mb"] / free["peak_mb"]
            if dense.get("step_s_median"):
                free["time_ratio_maskfree_over_dense"] = free["step_s_median"] / dense["step_s_median"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({key: (f"{v:.4g}" if isinstance(v, float) else v) for key, v in row.items()})
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
