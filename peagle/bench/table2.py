"""Paper Table 2: training overhead of the EAGLE-3, PARD-style and P-EAGLE data paths.

A data path is what one training example costs before and during its forward+backward: a
collator (``load``) and a training step (``step``). The rows (:data:`ROWS`):

* **pard / amortized / maskfree** -- the parallel drafter's paths, one per mask strategy: COD
  sampling (``cod_sample``), the cross-depth attention mask (``pard_mask`` built from scratch /
  ``AmortizedMask.get`` / whatever the strategy's ``MaskBuilder`` returns) and gathering the
  per-element inputs and targets (``build_example``); the step is ``example_loss`` + backward
  on the configured drafter (``cfg.drafter``). Every mask path sees the same COD samples.
* **eagle3** -- EAGLE-3's training-time test (DESIGN §5): the collator only gathers the window's
  shifted rows (a copy, as a DataLoader collator makes; no COD sample, no mask -- its attention,
  causal plus the chain's own earlier steps, is computed inside the forward by
  ``peagle.eagle3.StepAttention``); the step is ``ttt_loss`` with ``methods.eagle3.ttt_steps``
  unrolled steps (the paper's EAGLE-3: 7) + backward, on a drafter built like the trainer builds
  EAGLE-3's (``methods.eagle3``'s layers, ``parallel=False``, frozen embeddings).

Two measurements per data path, on the same examples:

* **data loading** -- the collator's work per example, summed over ``scaling.table2_examples``
  examples (the paper's 128).
* **epoch time** -- measured per-example training time x examples in one epoch, plus measured
  optimizer-step time x optimizer steps in the epoch. Per-example time = mean data loading
  (above) + mean forward+backward of the drafter, timed on ``scaling.table2_timed_steps``
  examples (after one untimed warm-up example in the process, and one more for a path with
  attention code of its own: mask-free attention, EAGLE-3's step attention).

Ratios are relative to P-EAGLE's amortized path (:data:`REFERENCE`).

Examples: the training set's stored sequences (hidden-state shards) are concatenated, in
dataset order, into one token stream that is cut into windows of ``scaling.table2_seq_len``
tokens, each treated as one document; when the stream is shorter than the examples needed, the
windows wrap around it. One epoch = ``ceil(training-set tokens / seq_len)`` such examples.
Drafters have random weights at the target's width (timings depend on shapes, not values); the
mask paths share one drafter, re-initialised per path. Data loading runs on the CPU, as in a
DataLoader collator; the head loss is not chunked on any path (``train.loss_chunk_rows`` unused).
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from peagle.bench.common import available_strategies, bench_drafter, sync, timed
from peagle.config import Config

REFERENCE = "amortized"  # ratios are relative to P-EAGLE's amortized path
EAGLE3_LABEL = "EAGLE-3 (training-time test, no mask)"


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
    from peagle.example import build_example

    t0 = time.perf_counter()
    layout = cod_sample(n, k, retention, retention_min, generator=gen)
    t1 = time.perf_counter()
    mask = builder(layout, n)
    t2 = time.perf_counter()
    ex = build_example(rows, layout, mask_token_id)
    t3 = time.perf_counter()
    return ex, mask, {"cod": t1 - t0, "mask": t2 - t1, "gather": t3 - t2}


@dataclass
class _Setting:
    """What every data path of one run shares."""

    cfg: Config
    examples: list[dict[str, torch.Tensor]]  # shifted rows of each window
    seq_len: int
    n: int  # rows per example
    k: int
    mask_token_id: int
    hidden_size: int
    vocab_size: int
    device: torch.device
    dtype: torch.dtype


class _MaskPath:
    """A parallel drafter's path: COD sample, the strategy's mask, per-element gather; the trainer's step."""

    def __init__(self, st: _Setting, strategy: str) -> None:
        from peagle.example import MaskBuilder
        from peagle.step import parallel_backward

        self.st = st
        self._step = parallel_backward  # imported here, not inside the timed step
        t0 = time.perf_counter()
        self.builder = MaskBuilder(strategy, st.n, st.k)
        self.setup_s = time.perf_counter() - t0
        self.drafter_key: tuple = ("parallel",)  # every mask path: the same drafter shape
        self.settings: dict[str, Any] = {}

    def build_drafter(self) -> tuple[torch.nn.Module, torch.Tensor]:
        st = self.st
        return bench_drafter(st.cfg, st.hidden_size, st.vocab_size, st.mask_token_id, st.seq_len + st.k,
                             st.device, st.dtype, seed=st.cfg.train.seed)

    def load(self, i: int) -> tuple[Any, dict[str, float], int]:
        """Collate example i: (payload for ``step``, seconds by part, elements)."""
        st, tc = self.st, self.st.cfg.train
        ex, mask, dt = load_example(st.examples[i], self.builder, st.n, st.k, tc.retention, tc.retention_min,
                                    _seq_gen(tc.seed, i), st.mask_token_id)
        return (ex, mask), dt, len(ex.layout)

    def step(self, drafter, head: torch.Tensor, payload: Any) -> None:
        """Forward + backward of one example."""
        ex, mask = payload
        self._step(drafter, head, ex, lambda _layout: mask, 1, self.st.cfg.train.loss, self.st.k)


class _TTTPath:
    """EAGLE-3's path: the collator copies the window's shifted rows; ``ttt_loss`` (DESIGN §5)."""

    def __init__(self, st: _Setting) -> None:
        from peagle.eagle3 import ttt_loss
        from peagle.train import MethodPlan

        self.st = st
        self._loss = ttt_loss  # imported here, not inside the timed step
        self.plan = plan = MethodPlan.of(st.cfg, "eagle3")
        self.setup_s = 0.0  # nothing precomputed
        self.drafter_key = ("eagle3", plan.num_layers, plan.embed_trainable)
        # Recorded in the provenance; paper_ttt_steps: the paper's EAGLE-3 (and EAGLE/SpecForge) unroll 7.
        self.settings = {"method": "eagle3", "ttt_steps": plan.depths, "paper_ttt_steps": 7,
                         "ttt_decay": plan.ttt_decay, "num_layers": plan.num_layers, "parallel": False,
                         "embed_trainable": plan.embed_trainable,
                         "elements_per_example": sum(max(st.n - s, 0) for s in range(plan.depths))}

    def build_drafter(self) -> tuple[torch.nn.Module, torch.Tensor]:
        st, plan = self.st, self.plan
        return bench_drafter(st.cfg, st.hidden_size, st.vocab_size, st.mask_token_id, st.seq_len + plan.depths,
                             st.device, st.dtype, seed=st.cfg.train.seed, num_layers=plan.num_layers,
                             parallel=False, embed_trainable=plan.embed_trainable)

    def load(self, i: int) -> tuple[Any, dict[str, float], int]:
        rows = self.st.examples[i]
        t0 = time.perf_counter()
        batch = {key: v.clone() for key, v in rows.items()}  # the collator's own tensors of the n rows
        dt = time.perf_counter() - t0
        return batch, {"gather": dt}, self.settings["elements_per_example"]

    def step(self, drafter, head: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        # ttt_loss normalises each step by its own supervised count (as the trainer uses it).
        loss, _ = self._loss(drafter, head, batch, self.plan.depths, self.plan.ttt_decay, self.st.cfg.train.loss)
        loss.backward()


@dataclass(frozen=True)
class DataPath:
    """One row of Table 2: a data path and how the table names it."""

    name: str  # key of its measurements in the provenance, and of ``run_table2(paths=...)``
    method: str  # the method in peagle/resources/paper_numbers.csv
    label: str  # the table's data_path column
    mask_strategy: str  # the table's mask_strategy column; "" for a path that builds no mask
    own_code: bool  # attention code of its own: one more untimed warm-up example
    make: Callable[[_Setting], Any]  # -> the path's loader/step for one run (_MaskPath, _TTTPath)


ROWS: tuple[DataPath, ...] = (
    DataPath("pard", "pard", "PARD-style (per-example mask construction)", "pard", False,
             lambda st: _MaskPath(st, "pard")),
    DataPath("amortized", "peagle", "P-EAGLE (amortized mask)", "amortized", False,
             lambda st: _MaskPath(st, "amortized")),
    DataPath("maskfree", "peagle-maskfree", "P-EAGLE (mask-free attention, ours)", "maskfree", True,
             lambda st: _MaskPath(st, "maskfree")),
    DataPath("eagle3", "eagle3", EAGLE3_LABEL, "", True, _TTTPath),
)


def _unavailable(cfg: Config, rows: Sequence[DataPath], n: int, k: int) -> dict[str, str]:
    """name -> why the path cannot be measured in this build / configuration."""
    masks = [r.mask_strategy for r in rows if r.mask_strategy]
    _, missing = available_strategies(masks, n, k)
    out = {r.name: f"mask strategy {r.mask_strategy!r} not in this build" for r in rows
           if r.mask_strategy in missing}
    for r in rows:
        if r.name == "eagle3" and ("eagle3" not in cfg.methods or cfg.methods["eagle3"].parallel):
            out[r.name] = "no autoregressive (parallel: false) method 'eagle3' in the configuration"
    return out


def run_table2(cfg: Config, target_json: str | Path, hidden_dir: str | Path, log=lambda m: None,
               paths: Sequence[str] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Measure every available data path of ``paths`` (default: all of :data:`ROWS`).

    Returns (table, provenance details).
    """
    import json

    sc, tc = cfg.scaling, cfg.train
    seq_len, k, count = sc.table2_seq_len, sc.table2_k, sc.table2_examples
    n = seq_len - 1  # rows of a seq_len-token example (DESIGN §1 shift)
    device = torch.device(cfg.runtime.device)
    dtype = getattr(torch, cfg.runtime.dtype)
    info = json.loads(Path(target_json).read_text())
    by_name = {r.name: r for r in ROWS}
    wanted = list(by_name) if paths is None else list(paths)
    unknown = [p for p in wanted if p not in by_name]
    if unknown:
        raise ValueError(f"unknown Table 2 data paths {unknown}; known: {', '.join(by_name)}")
    rows_wanted = [by_name[p] for p in wanted]
    missing = _unavailable(cfg, rows_wanted, n, k)
    for name, why in missing.items():
        log(f"data path {name} left out: {why}")
    rows_run = [r for r in rows_wanted if r.name not in missing]

    stream, facts = token_stream(hidden_dir, count * seq_len)
    examples = [rows_of(window(stream, i * seq_len, seq_len)) for i in range(count)]
    per_epoch = math.ceil(facts["train_tokens"] / seq_len)
    opt_steps = math.ceil(per_epoch / tc.grad_accum)
    log(f"{count} examples of {seq_len} tokens (K={k}, r={tc.retention}) from {facts['sequences_used']} "
        f"stored sequences; epoch = {per_epoch} examples, {opt_steps} optimizer steps")
    st = _Setting(cfg=cfg, examples=examples, seq_len=seq_len, n=n, k=k, mask_token_id=int(info["mask_token_id"]),
                  hidden_size=int(info["hidden_size"]), vocab_size=int(info["vocab_size"]), device=device,
                  dtype=dtype)

    results: dict[str, dict[str, Any]] = {}
    path_settings: dict[str, dict[str, Any]] = {}
    drafter = head = init_state = None
    drafter_key = None
    for row in rows_run:
        name = row.name
        path = row.make(st)
        if path.settings:
            path_settings[name] = path.settings
        parts: dict[str, list[float]] = {}
        elements = []
        for i in range(count):
            payload, dt, n_el = path.load(i)
            for key, v in dt.items():
                parts.setdefault(key, []).append(v)
            elements.append(n_el)
            payload = None  # free before the next example is built
        load = [sum(v) for v in zip(*parts.values())]
        mask_ms = statistics.mean(parts["mask"]) * 1e3 if "mask" in parts else 0.0
        log(f"{name}: data loading {sum(load):.2f} s for {count} examples (mask {mask_ms:.1f} ms/example)")

        if path.drafter_key != drafter_key:
            # One drafter per shape (the mask paths share one), re-initialised per path below.
            drafter = head = init_state = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            drafter, head = path.build_drafter()
            init_state = {key: v.clone() for key, v in drafter.state_dict().items()}
            drafter_key = path.drafter_key
        drafter.load_state_dict(init_state)
        params = [p for p in drafter.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
        drafter.train()

        def optimizer_step() -> None:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        fwd_bwd = []
        # One untimed warm-up example per process (first-call costs: thread pool, allocator,
        # kernel selection) -- and per path that brings attention code of its own.
        warm = 1 if (not results or row.own_code) else 0
        for j in range(sc.table2_timed_steps + warm):
            payload, _, _ = path.load(j % count)
            _, dt = timed(device, path.step, drafter, head, payload)
            if j >= warm:
                fwd_bwd.append(dt)
            payload = None  # free before the next example is built
        _, opt_s = timed(device, optimizer_step)
        opt = None
        per_example = statistics.mean(load) + statistics.mean(fwd_bwd)
        epoch_s = per_example * per_epoch + opt_s * opt_steps
        log(f"{name}: forward+backward {statistics.mean(fwd_bwd):.2f} s/example, epoch {epoch_s:.1f} s")
        results[name] = {
            "load_s": sum(load), "load_s_per_example": statistics.mean(load),
            "parts_ms_mean": {key: statistics.mean(v) * 1e3 for key, v in parts.items()},
            "parts_ms_median": {key: statistics.median(v) * 1e3 for key, v in parts.items()},
            "setup_s": path.setup_s, "fwd_bwd_s": fwd_bwd, "optimizer_step_s": opt_s,
            "epoch_s": epoch_s, "elements_mean": statistics.mean(elements),
        }
        sync(device)
    drafter = head = init_state = None

    if REFERENCE not in results:
        raise RuntimeError("Table 2 needs the amortized data path (P-EAGLE) as its reference")
    ref = results[REFERENCE]
    paper = _paper_table2()
    table = []
    for row in rows_run:
        res = results[row.name]
        table.append({
            "method": row.method, "data_path": row.label, "mask_strategy": row.mask_strategy,
            "load_s_128_examples" if count == 128 else f"load_s_{count}_examples": round(res["load_s"], 3),
            "load_ratio_vs_peagle": round(res["load_s"] / ref["load_s"], 2),
            "mask_ms_per_example": round(res["parts_ms_mean"].get("mask", 0.0), 2),
            "epoch_s": round(res["epoch_s"], 3),
            "epoch_ratio_vs_peagle": round(res["epoch_s"] / ref["epoch_s"], 3),
            # The paper's recorded values (peagle/resources/paper_numbers.csv), for comparison.
            "paper_load_s_128_examples": paper.get((row.method, "load_s_128_examples"), ""),
            "paper_epoch_hours_8xH200": paper.get((row.method, "epoch_hours"), ""),
        })
    details = {
        "setting": {"seq_len": seq_len, "rows_per_example": n, "k": k, "retention": tc.retention,
                    "retention_min": tc.retention_min, "examples": count, "timed_steps": sc.table2_timed_steps,
                    "grad_accum": tc.grad_accum, "examples_per_epoch": per_epoch, "optimizer_steps_per_epoch": opt_steps,
                    "device": str(device), "dtype": cfg.runtime.dtype, "threads": torch.get_num_threads(),
                    "head_loss_chunk_rows": None, **path_settings},
        "data": {**facts, "hidden_dir": str(hidden_dir), "target": str(target_json)},
        "paths": [r.name for r in rows_run],
        "paths_missing": missing,
        "strategies_missing": [r.mask_strategy for r in rows_wanted if r.name in missing and r.mask_strategy],
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
                 config_files: list[str] | None = None, log=lambda m: None,
                 paths: Sequence[str] | None = None) -> pd.DataFrame:
    """Run the measurements (``paths``: default all of :data:`ROWS`) and write ``out`` (CSV) and its
    ``.provenance.json`` sidecar."""
    from peagle.provenance import write_table

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t0 = time.perf_counter()
    df, details = run_table2(cfg, target_json, hidden_dir, log=log, paths=paths)
    provenance = {
        "what": ("training overhead: data-loading time for the configured number of examples, and time for "
                 "one epoch of the training set, per data path (EAGLE-3's training-time test; the PARD-style "
                 "and P-EAGLE mask strategies); ratios vs P-EAGLE's amortized path"),
        "method": {
            "data_loading": "sum over examples of the collator's per-example work, timed on CPU with "
                            "time.perf_counter. Mask paths: COD sampling + mask retrieval/construction + input "
                            "gathering (build_example). EAGLE-3: a copy of the window's shifted rows only (no "
                            "COD sample, no mask: its attention is computed inside the forward, "
                            "peagle.eagle3.StepAttention)",
            "forward_backward": "mask paths: example_loss + backward of loss / supervised elements; EAGLE-3: "
                                "ttt_loss with setting.eagle3.ttt_steps unrolled steps + backward; head loss "
                                "not chunked on any path",
            "epoch_time": "NOT a full epoch: (mean data loading + mean measured forward+backward per example) x "
                          "examples per epoch + measured optimizer-step time x optimizer steps per epoch",
            "examples": "training-set sequences concatenated in dataset order into one stream, cut into "
                        "windows of seq_len tokens (one document each; wrapping around when short)",
            "epoch": "ceil(training-set tokens / seq_len) examples",
            "drafter": "random weights at the target's width; mask paths: the configured architecture "
                       "(drafter.*), one drafter re-initialised per path; EAGLE-3: as the trainer builds it "
                       "(methods.eagle3 layers, parallel=False, frozen embeddings; see setting.eagle3)",
        },
        "paper_setting": "2048 tokens, K=8, 128 examples; epoch on 8xH200 (hours)",
        "example_seeds": {"cod_example_i": "train.seeds[0] * 1000003 + i", "drafter_init": cfg.train.seed},
        "started": started,
        "wall_s": time.perf_counter() - t0,
        **details,
    }
    write_table(df, out, table="table2", cfg=cfg, config_files=config_files, **provenance)
    return df
