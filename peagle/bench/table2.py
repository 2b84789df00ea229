"""Paper Table 2: training overhead of the PARD-style and P-EAGLE data paths.

Two measurements per data path (mask strategy), on the same examples and the same COD samples:

* **data loading** -- what a collator does per example: COD sampling (``cod_sample``), the
  attention mask (``pard_mask`` built from scratch / ``AmortizedMask.get`` / whatever the
  strategy's ``MaskBuilder`` returns) and gathering the per-element inputs and targets
  (``build_example``); summed over ``scaling.table2_examples`` examples (the paper's 128).
* **epoch time** -- measured per-example training time x examples in one epoch, plus measured
  optimizer-step time x optimizer steps in the epoch. Per-example time = mean data loading
  (above) + mean forward+backward of the drafter (``example_loss`` + backward), timed on
  ``scaling.table2_timed_steps`` examples (after one untimed warm-up example in the process,
  and one more for a strategy with attention code of its own).

Examples: the training set's stored sequences (hidden-state shards) are concatenated, in
dataset order, into one token stream that is cut into windows of ``scaling.table2_seq_len``
tokens, each treated as one document; when the stream is shorter than the examples needed, the
windows wrap around it. One epoch = ``ceil(training-set tokens / seq_len)`` such examples.
The drafter has the configured architecture at the target's width with random weights (timings
depend on shapes, not values). Data loading runs on the CPU, as in a DataLoader collator.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from peagle.bench.common import available_strategies, bench_drafter, sync, timed
from peagle.config import Config
from peagle.io import atomic_write_json, atomic_write_text

# Table rows: mask strategy -> (method name as in paper_numbers.csv, row label). EAGLE-3's row
# is a separate (autoregressive) data path, added when that baseline exists.
ROWS = {
    "pard": ("pard", "PARD-style (per-example mask construction)"),
    "amortized": ("peagle", "P-EAGLE (amortized mask)"),
    "maskfree": ("peagle-maskfree", "P-EAGLE (mask-free attention, ours)"),
}
REFERENCE = "amortized"  # ratios are relative to P-EAGLE's amortized path


def token_stream(hidden_dir: str | Path, tokens_needed: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stored sequences concatenated in dataset order until ``tokens_needed`` tokens (or all).

    Returns the stream {input_ids [N], aux_hidden [N, 3H], last_hidden [N, H], loss_mask [N]}
    and facts about it (sequences used, training-set tokens and sequences).
    """
    from peagle.hidden import HiddenStateDataset

    ds = HiddenStateDataset(hidden_dir)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", "aux_hidden", "last_hidden", "loss_mask")}
    got = used = 0
    for i in range(len(ds)):
        seq = ds[i]
        for key in parts:
            parts[key].append(seq[key])
        got += int(seq["input_ids"].shape[0])
        used += 1
        if got >= tokens_needed:
            break
    stream = {key: torch.cat(v) for key, v in parts.items()}
    facts = {"sequences_used": used, "stream_tokens": got, "train_tokens": ds.num_tokens,
             "train_sequences": len(ds), "hidden_size": ds.hidden_size, "hidden_dtype": ds.dtype}
    return stream, facts


def window(stream: dict[str, torch.Tensor], start: int, length: int) -> dict[str, torch.Tensor]:
    """``length`` tokens of the stream from ``start``, wrapping around its end."""
    total = int(stream["input_ids"].shape[0])
    start %= total
    if start + length <= total:
        return {k: v[start:start + length] for k, v in stream.items()}
    idx = torch.arange(start, start + length) % total
    return {k: v[idx] for k, v in stream.items()}


def _seq_gen(seed: int, i: int) -> torch.Generator:
    # Same COD sample of example i for every data path.
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


def load_example(rows: dict[str, torch.Tensor], builder, n: int, k: int, retention: float,
                 retention_min: float, gen: torch.Generator, mask_token_id: int):
    """One collator call: COD sample, mask, input gathering. Returns (example, mask, seconds by part)."""
    from peagle.cod import cod_sample
    from peagle.train import build_example

    t0 = time.perf_counter()
    layout = cod_sample(n, k, retention, retention_min, generator=gen)
    t1 = time.perf_counter()
    mask = builder(layout, n)
    t2 = time.perf_counter()
    ex = build_example(rows, layout, mask_token_id)
    t3 = time.perf_counter()
    return ex, mask, {"cod": t1 - t0, "mask": t2 - t1, "gather": t3 - t2}


def run_table2(cfg: Config, target_json: str | Path, hidden_dir: str | Path,
               log=lambda m: None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Measure every available data path; returns (table, provenance details)."""
    import json

    from peagle.train import MaskBuilder, example_loss

    sc, tc = cfg.scaling, cfg.train
    seq_len, k, count = sc.table2_seq_len, sc.table2_k, sc.table2_examples
    n = seq_len - 1  # rows of a seq_len-token example (DESIGN §1 shift)
    device = torch.device(cfg.runtime.device)
    dtype = getattr(torch, cfg.runtime.dtype)
    info = json.loads(Path(target_json).read_text())
    strategies, missing = available_strategies(["pard", "amortized", "maskfree"], n, k)
    if missing:
        log(f"mask strategies not available in this build, left out: {', '.join(missing)}")

    stream, facts = token_stream(hidden_dir, count * seq_len)
    examples = [rows_of(window(stream, i * seq_len, seq_len)) for i in range(count)]
    per_epoch = math.ceil(facts["train_tokens"] / seq_len)
    opt_steps = math.ceil(per_epoch / tc.grad_accum)
    log(f"{count} examples of {seq_len} tokens (K={k}, r={tc.retention}) from {facts['sequences_used']} "
        f"stored sequences; epoch = {per_epoch} examples, {opt_steps} optimizer steps")

    results: dict[str, dict[str, Any]] = {}
    drafter = head = None
    for name in strategies:
        t0 = time.perf_counter()
        builder = MaskBuilder(name, n, k)
        setup_s = time.perf_counter() - t0
        parts = {"cod": [], "mask": [], "gather": []}
        layout_len = []
        for i, rows in enumerate(examples):
            ex, mask, dt = load_example(rows, builder, n, k, tc.retention, tc.retention_min, _seq_gen(tc.seed, i),
                                        int(info["mask_token_id"]))
            for key, v in dt.items():
                parts[key].append(v)
            layout_len.append(len(ex.layout))
            ex = mask = None  # free before the next example is built
        load = [a + b + c for a, b, c in zip(parts["cod"], parts["mask"], parts["gather"])]
        log(f"{name}: data loading {sum(load):.2f} s for {count} examples "
            f"(mask {statistics.mean(parts['mask']) * 1e3:.1f} ms/example)")

        if drafter is None:  # one drafter shape for every path; re-initialised per path below
            drafter, head = bench_drafter(cfg, int(info["hidden_size"]), int(info["vocab_size"]),
                                          int(info["mask_token_id"]), seq_len + k, device, dtype, seed=tc.seed)
            init_state = {key: v.clone() for key, v in drafter.state_dict().items()}
        drafter.load_state_dict(init_state)
        params = [p for p in drafter.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
        drafter.train()

        def fwd_bwd_step(ex, mask) -> None:
            loss_sum, _ = example_loss(drafter, head, ex, mask, tc.loss, k)
            (loss_sum / max(int(ex.gate.sum()), 1)).backward()

        def optimizer_step() -> None:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        fwd_bwd = []
        # One untimed warm-up example per process (first-call costs: thread pool, allocator,
        # kernel selection) -- and per strategy that brings code of its own (mask-free attention).
        warm = 1 if (not results or name not in ("pard", "amortized")) else 0
        for j in range(sc.table2_timed_steps + warm):
            ex, mask, _ = load_example(examples[j % count], builder, n, k, tc.retention, tc.retention_min,
                                       _seq_gen(tc.seed, j % count), int(info["mask_token_id"]))
            _, dt = timed(device, fwd_bwd_step, ex, mask)
            if j >= warm:
                fwd_bwd.append(dt)
            ex = mask = None  # free before the next example is built
        _, opt_s = timed(device, optimizer_step)
        opt = None
        per_example = statistics.mean(load) + statistics.mean(fwd_bwd)
        epoch_s = per_example * per_epoch + opt_s * opt_steps
        log(f"{name}: forward+backward {statistics.mean(fwd_bwd):.2f} s/example, epoch {epoch_s:.1f} s")
        results[name] = {
            "load_s": sum(load), "load_s_per_example": statistics.mean(load),
            "parts_ms_mean": {key: statistics.mean(v) * 1e3 for key, v in parts.items()},
            "parts_ms_median": {key: statistics.median(v) * 1e3 for key, v in parts.items()},
            "setup_s": setup_s, "fwd_bwd_s": fwd_bwd, "optimizer_step_s": opt_s,
            "epoch_s": epoch_s, "elements_mean": statistics.mean(layout_len),
        }
        sync(device)

    if REFERENCE not in results:
        raise RuntimeError("Table 2 needs the amortized data path (P-EAGLE) as its reference")
    ref = results[REFERENCE]
    paper = _paper_table2()
    table = []
    for name, res in results.items():
        method, label = ROWS.get(name, (name, name))
        table.append({
            "method": method, "data_path": label, "mask_strategy": name,
            "load_s_128_examples" if count == 128 else f"load_s_{count}_examples": round(res["load_s"], 3),
            "load_ratio_vs_peagle": round(res["load_s"] / ref["load_s"], 2),
            "mask_ms_per_example": round(res["parts_ms_mean"]["mask"], 2),
            "epoch_s": round(res["epoch_s"], 3),
            "epoch_ratio_vs_peagle": round(res["epoch_s"] / ref["epoch_s"], 3),
            # The paper's recorded values (peagle/resources/paper_numbers.csv), for comparison.
            "paper_load_s_128_examples": paper.get((method, "load_s_128_examples"), ""),
            "paper_epoch_hours_8xH200": paper.get((method, "epoch_hours"), ""),
        })
    details = {
        "setting": {"seq_len": seq_len, "rows_per_example": n, "k": k, "retention": tc.retention,
                    "retention_min": tc.retention_min, "examples": count, "timed_steps": sc.table2_timed_steps,
                    "grad_accum": tc.grad_accum, "examples_per_epoch": per_epoch, "optimizer_steps_per_epoch": opt_steps,
                    "device": str(device), "dtype": cfg.runtime.dtype, "threads": torch.get_num_threads()},
        "data": {**facts, "hidden_dir": str(hidden_dir), "target": str(target_json)},
        "strategies_missing": missing,
        "measurements": results,
        "host": {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__},
    }
    return pd.DataFrame(table), details


def _paper_table2() -> dict[tuple[str, str], str]:
    """(method, metric) -> the paper's Table 2 value as recorded (strings: e.g. ">12")."""
    from peagle.tables import paper_numbers

    df = paper_numbers()
    df = df[df["table"] == "table2"]
    return {(r.method, r.metric): r.value for r in df.itertuples()}


def rows_of(seq: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from peagle.hidden import shifted_rows

    return shifted_rows(seq)


def write_table2(cfg: Config, target_json: str | Path, hidden_dir: str | Path, out: str | Path,
                 config_files: list[str] | None = None, log=lambda m: None) -> pd.DataFrame:
    """Run the measurements and write ``out`` (CSV) and its ``.provenance.json`` sidecar."""
    from peagle.tables import git_commit

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    df, details = run_table2(cfg, target_json, hidden_dir, log=log)
    out = Path(out)
    atomic_write_text(out, df.to_csv(index=False))
    provenance = {
        "table": "table2",
        "profile": cfg.profile,
        "what": ("training overhead: data-loading time for the configured number of examples, and time for "
                 "one epoch of the training set, per data path (mask strategy); ratios vs P-EAGLE's "
                 "amortized path"),
        "method": {
            "data_loading": "sum over examples of per-example COD sampling + mask retrieval/construction + "
                            "input gathering (build_example), timed on CPU with time.perf_counter",
            "epoch_time": "NOT a full epoch: (mean data loading + mean measured forward+backward per example) x "
                          "examples per epoch + measured optimizer-step time x optimizer steps per epoch",
            "examples": "training-set sequences concatenated in dataset order into one stream, cut into "
                        "windows of seq_len tokens (one document each; wrapping around when short)",
            "epoch": "ceil(training-set tokens / seq_len) examples",
            "drafter": "configured architecture at the target's width, random weights",
            "not_included": "EAGLE-3's row (its autoregressive data path is not built yet)",
        },
        "paper_setting": "2048 tokens, K=8, 128 examples; epoch on 8xH200 (hours)",
        "commit": git_commit(),
        "config_files": config_files,
        "config": cfg.to_dict(),
        "seeds": {"global": cfg.seed, "train": cfg.train.seed,
                  "cod_example_i": "train.seed * 1000003 + i", "drafter_init": cfg.train.seed},
        "started": started,
        "wall_s": time.perf_counter() - t0,
        **details,
    }
    atomic_write_json(out.with_suffix(".provenance.json"), provenance)
    return df
