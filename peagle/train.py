"""Drafter training (DESIGN §3-5): one loop for every method of ``cfg.methods``.

The loop lives here; what one step computes is library code the benchmarks share:
:mod:`peagle.example` (a sequence's super-sequence and its mask), :mod:`peagle.losses` (the
distillation loss) and :mod:`peagle.step` (one example's forward and backward, whole or
partitioned), with EAGLE-3's training-time test in :mod:`peagle.eagle3`.

Parallel drafters (P-EAGLE, PARD-style, ParallelSpec) train on super-sequences -- COD-sampled
depths or the full n x K grid -- under the configured cross-depth mask strategy, optionally
partitioned; EAGLE-3 trains by training-time test (``peagle.eagle3``). Same data, loss,
optimizer, logging, checkpoints, resume and budgets for all.

One training sequence is one micro-batch (the paper's recipe: micro-batch 1, gradient
accumulation over sequences). The data order, every COD sample and the initial weights are
functions of the seed alone, so a run killed and resumed from a checkpoint ends where an
uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from peagle import checkpoint as ckpt
from peagle import distributed
from peagle import memory
from peagle.cod import cod_sample, full_grid
from peagle.config import Config
from peagle.distributed import World
from peagle.drafters import DrafterSpec, build_drafter, num_parameters
from peagle.example import MaskBuilder, TrainingError, build_example, load_rows, truncate
from peagle.io import atomic_write_json
from peagle.partition import segments_for
from peagle.step import parallel_backward

__all__ = ["MethodPlan", "InfeasibleRun", "TrainingError", "train_drafter", "record_failure"]


@dataclass(frozen=True)
class MethodPlan:
    """A method's settings in effect: ``cfg.methods[name]`` with unset fields from drafter/train."""

    name: str
    parallel: bool
    cod: bool
    num_layers: int
    mask_strategy: str
    partitions: int
    segment_rows: int | None
    embed_trainable: bool
    depths: int  # K_train (parallel) or TTT steps (EAGLE-3): the per-depth accuracy columns
    ttt_decay: float

    @classmethod
    def of(cls, cfg: Config, name: str) -> "MethodPlan":
        try:
            m = cfg.method(name)
        except ValueError as err:
            raise TrainingError(str(err)) from None
        tc, dc = cfg.train, cfg.drafter
        return cls(
            name=name, parallel=m.parallel, cod=m.cod,
            num_layers=m.num_layers if m.num_layers is not None else dc.num_layers,
            mask_strategy=m.mask_strategy or tc.mask_strategy,
            partitions=m.partitions if m.partitions is not None else (tc.partitions if m.parallel else 1),
            segment_rows=m.segment_rows if m.segment_rows is not None else tc.segment_rows,
            embed_trainable=m.embed_trainable if m.embed_trainable is not None else dc.embed_trainable,
            depths=tc.k_train if m.parallel else m.ttt_steps,
            ttt_decay=m.ttt_decay,
        )


class InfeasibleRun(RuntimeError):
    """The measured step time projects an epoch beyond ``train.time_budget_s_per_epoch``."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(f"projected epoch {record['projected_epoch_s']:.0f} s exceeds the budget of "
                         f"{record['time_budget_s_per_epoch']:.0f} s")
        self.record = record


# --------------------------------------------------------------------------- run state


def _seq_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 100_003 + index)


def epoch_order(num: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(num, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def shard_window_order(shards: Sequence[int], seed: int, epoch: int, window: int | None) -> list[int]:
    """One epoch's order of the positions ``0..n-1``, where position i's sequence is in shard ``shards[i]``.

    The shards in a seeded order, cut into windows of ``window`` shards; each window's positions in
    a seeded random order, window after window. So each shard is read once per epoch, and a reader
    holding 2 windows of shards never reads one twice (a step's batch may span two windows). At most
    ``window`` distinct shards (or ``window`` None): :func:`epoch_order`, the whole set shuffled.
    """
    distinct = sorted(set(shards))
    if window is None or len(distinct) <= window:
        return epoch_order(len(shards), seed, epoch)
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    members: dict[int, list[int]] = {s: [] for s in distinct}
    for pos, shard in enumerate(shards):
        members[shard].append(pos)
    ordered = [distinct[i] for i in torch.randperm(len(distinct), generator=g).tolist()]
    out: list[int] = []
    for w in range(0, len(ordered), window):
        group = [pos for shard in ordered[w:w + window] for pos in members[shard]]
        out.extend(group[i] for i in torch.randperm(len(group), generator=g).tolist())
    return out


def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then linear decay to 0 at ``total`` optimizer steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


class _Killed(RuntimeError):
    """Raised by ``stop_after_steps`` to simulate a killed run in tests."""


class _PeerStopped(RuntimeError):
    """A non-main training process stops because another one ran out of memory (the main one records it)."""


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main entry


def train_drafter(
    cfg: Config,
    target_json: str | Path,
    hidden_dir: str | Path,
    method: str,
    ctx: int,
    out_dir: str | Path,
    *,
    stop_after_steps: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Train one drafter of ``method`` (a key of ``cfg.methods``) at training context ``ctx``.

    ``hidden_dir``: the hidden-state store (``train.hidden_source`` offline), or the responses
    JSONL whose hidden states the target computes as training reads them (online).

    Resumes from ``out_dir/checkpoints`` if a checkpoint is there. Writes ``out_dir/final``
    (vLLM-loadable), ``out_dir/metrics.jsonl`` (one line per optimizer step) and
    ``out_dir/summary.json``, and returns the summary. A run that exceeds the memory budget ends
    with ``status: "OOM"``; one whose measured step time projects an epoch beyond the time budget
    ends with ``status: "infeasible"``. Both are results (the measurement is recorded), not errors.
    """
    out = Path(out_dir)
    main = World.from_env().is_main
    if main:
        (out / "summary.json").unlink(missing_ok=True)  # never let an old result stand for this run
    try:
        summary = _train(cfg, target_json, hidden_dir, method, ctx, out, stop_after_steps=stop_after_steps,
                         progress=progress, log=log)
    except InfeasibleRun as err:
        summary = err.record
        log(f"INFEASIBLE: {err}")
    except _PeerStopped as err:
        return {"status": "stopped", "error": str(err)}
    if not main:
        return summary
    if summary.get("status") != "ok":
        summary = record_failure(cfg, target_json, method, ctx, out, summary)
    return summary


def record_failure(cfg: Config, target_json: str | Path, method: str, ctx: int, out_dir: str | Path,
                   record: dict[str, Any]) -> dict[str, Any]:
    """Write ``out_dir/summary.json`` for a run that made no drafter (``record``: status OOM or
    infeasible and its measurement), with the run's cell (method, context, layers, target, seed)."""
    info = json.loads(Path(target_json).read_text())
    summary = {**record, "method": method, "ctx": ctx, "drafter_layers": MethodPlan.of(cfg, method).num_layers,
               "target_name": info.get("name"), "target": info.get("path"), "seed": cfg.train.seed}
    atomic_write_json(Path(out_dir) / "summary.json", summary)
    return summary


@memory.reports_oom  # past train.memory_budget_mb -> summary.json status OOM with the bytes that went over
def _train(cfg: Config, target_json: str | Path, hidden_dir: str | Path, method: str, ctx: int, out_dir: Path, *,
           stop_after_steps: int | None, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from peagle.eagle3 import ttt_loss
    from peagle.hidden import HiddenStateDataset
    from peagle.target import read_embedding_tensors, read_target_json

    plan = MethodPlan.of(cfg, method)
    if ctx < 3:
        raise TrainingError(f"training context length {ctx} is too short (need >= 3 tokens)")
    tc, dc = cfg.train, cfg.drafter
    torch.set_num_threads(cfg.runtime.threads)
    world = World.from_env()  # torchrun's processes; one without it
    device = world.device(torch.device(cfg.runtime.device))
    world.check(tc.grad_accum, device)
    world.init(device)
    if not world.is_main:  # one voice: the main process logs, writes metrics, checkpoints and results
        log, progress = (lambda m: None), False
    dtype = getattr(torch, cfg.runtime.dtype)
    if dtype == torch.float16:
        raise TrainingError("runtime.dtype float16 is not a training precision here (it needs loss scaling); "
                            "train in bfloat16 (fp32 master weights, bf16 compute) or float32")
    # bf16: mixed precision. The drafter's weights, gradients and AdamW moments stay fp32 (an
    # update below one bf16 rounding step still lands); forwards run under bf16 autocast.
    mixed = dtype == torch.bfloat16
    param_dtype = torch.float32 if mixed else dtype

    def forward_ctx():
        return torch.autocast(device.type, dtype=dtype) if mixed else contextlib.nullcontext()

    out = out_dir
    ckpt_root = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)

    info = read_target_json(target_json)
    if tc.hidden_source == "online":  # hidden_dir is the responses JSONL
        from peagle.hidden import OnlineHiddenStates
        from peagle.target import load_target

        target_model, _, _ = load_target(target_json, device=device, dtype=cfg.runtime.dtype)
        dataset = OnlineHiddenStates(target_model, hidden_dir, info["aux_layer_ids"], cfg.hidden.dtype)
    else:
        # Two windows of shards in memory: a step's batch may span a window boundary (shard_window_order).
        dataset = HiddenStateDataset(hidden_dir, cache_shards=2 * (tc.shard_window or 1))
    if list(dataset.aux_layer_ids) != list(info["aux_layer_ids"]):
        raise TrainingError(f"{hidden_dir}: hidden states were extracted at layers {dataset.aux_layer_ids} "
                            f"but {target_json} says {info['aux_layer_ids']}; re-run extraction")
    if dataset.hidden_size != info["hidden_size"]:
        raise TrainingError(f"{hidden_dir}: hidden size {dataset.hidden_size} != target's {info['hidden_size']}")
    # Only the two tensors the drafter copies, straight from the safetensors files: never the whole
    # target (a 120B one would be ~468 GB in fp32 on the CPU).
    embed, head = read_embedding_tensors(target_json, dtype=torch.float32)

    h = info["hidden_size"]
    head_dim = dc.head_dim or h // dc.num_heads
    spec = DrafterSpec(
        hidden_size=h, vocab_size=head.shape[0], num_layers=plan.num_layers, num_heads=dc.num_heads,
        num_kv_heads=dc.num_kv_heads, head_dim=head_dim, intermediate_size=dc.intermediate_size,
        mask_token_id=int(info["mask_token_id"]), aux_layer_ids=list(info["aux_layer_ids"]),
        rms_norm_eps=dc.rms_norm_eps, rope_theta=dc.rope_theta,
        max_position_embeddings=max(ctx + plan.depths, int(info.get("max_position_embeddings") or 0)),
        parallel=plan.parallel,
        hidden_variant=dc.hidden_variant if plan.parallel else "shared",
        max_depth=tc.k_train - 1 if plan.parallel else 0,
    )
    drafter = build_drafter(spec, embed=embed, lm_head=head, seed=tc.seed).to(device=device, dtype=param_dtype)
    drafter.embed_tokens.weight.requires_grad_(plan.embed_trainable)
    drafter.lm_head.weight.requires_grad_(dc.lm_head_trainable)
    target_head = head.to(device=device, dtype=dtype)
    masks = None
    if plan.parallel:
        if plan.mask_strategy == "amortized" and ctx - 1 > tc.max_mask_len:
            # Fail before any work rather than at the first long sequence.
            raise TrainingError(f"training context {ctx} needs a precomputed mask of {ctx - 1} positions, but "
                                f"train.max_mask_len is {tc.max_mask_len}; raise it to at least {ctx - 1}")
        masks = MaskBuilder(plan.mask_strategy, tc.max_mask_len, tc.k_train)

    # Sequences with at least one supervised row inside the context window.
    # From the manifest where it records each sequence's first supervised position (no shard is
    # read: a store can be terabytes), else by reading the sequences.
    usable, shortest = [], None
    first = dataset.first_supervised
    for i, length in enumerate(dataset.lengths):
        n = min(length, ctx)
        if first is not None:
            ok = first[i] is not None and first[i] < n
        else:
            ok = n >= 2 and bool(truncate(dataset[i], ctx)["loss_mask"][1:].any())
        if ok:
            usable.append(i)
            shortest = n - 1 if shortest is None else min(shortest, n - 1)
    if not usable:
        raise TrainingError(f"{hidden_dir}: no sequence has a supervised token within the first {ctx} tokens")
    if segments_for(shortest, plan.partitions, plan.segment_rows) > shortest:
        # Checked up front so that a run never stops halfway at the first short sequence.
        raise TrainingError(f"partitions={plan.partitions} (train.partitions / methods.{method}.partitions) "
                            f"exceeds the {shortest} rows of the shortest training sequence at ctx={ctx}; "
                            f"use at most {shortest} partitions")
    usable_shards = [dataset.shard_of(i) for i in usable]
    steps_per_epoch = math.ceil(len(usable) / tc.grad_accum)
    total_steps = tc.epochs * steps_per_epoch
    warmup = max(1, math.ceil(tc.warmup_ratio * total_steps))

    existing = ckpt.list_checkpoints(ckpt_root)
    resume_from = existing[-1] if existing else None
    if resume_from is not None:  # the whole weights go in before sharding
        resumed, _ = ckpt.load_drafter(resume_from, device=device, dtype=param_dtype)
        drafter.load_state_dict(resumed.state_dict())
    sharded = tc.parallelism == "fsdp" and world.size > 1
    if sharded:
        distributed.shard(drafter)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup))

    meta = {"method": method, "ctx": ctx, "parallel": plan.parallel, "cod": plan.cod,
            "k_train": tc.k_train if plan.parallel else None,
            "ttt_steps": None if plan.parallel else plan.depths, "ttt_decay": None if plan.parallel else plan.ttt_decay,
            "retention": tc.retention if plan.cod else None,
            "retention_min": tc.retention_min if plan.cod else None, "loss": tc.loss,
            "mask_strategy": plan.mask_strategy if plan.parallel else None, "partitions": plan.partitions,
            "segment_rows": plan.segment_rows if plan.parallel else None,
            "embed_trainable": plan.embed_trainable,
            "target": info["path"], "target_name": info.get("name"), "seed": tc.seed}
    metrics_path = out / "metrics.jsonl"
    start_step, metrics = 0, []
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        opt.load_state_dict(distributed.shard_optimizer_state(state["optimizer"], params) if sharded
                            else state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_step = state["step"]
        if metrics_path.exists():
            metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            metrics = [m for m in metrics if m["step"] <= start_step]
        log(f"resuming from {resume_from} at optimizer step {start_step}/{total_steps}")
    if world.is_main:
        _write_jsonl_atomic(metrics_path, metrics)

    if tc.parallelism == "fsdp" and world.size == 1:
        log("train.parallelism is fsdp, but one process has nothing to shard it over: training it whole")
    what = (f"mask={plan.mask_strategy}, partitions={plan.partitions}"
            + (f" (segments of <= {plan.segment_rows} rows)" if plan.segment_rows and plan.partitions > 1 else "")
            if plan.parallel else f"ttt_steps={plan.depths}")
    log(f"training {method} ctx={ctx}: {len(usable)} sequences, {total_steps} optimizer steps, "
        f"{num_parameters(drafter) / 1e6:.2f}M params, {plan.num_layers} layers, {what}")
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not progress, desc=f"{method} ctx={ctx}",
               file=sys.stderr, dynamic_ncols=True)
    drafter.train()
    # Meter the loop (data, activations, gradients, optimizer moments) on top of what exists
    # already: weights, the target head and, after a resume, the loaded optimizer state -- so
    # that a resumed run counts the bytes an uninterrupted one does.
    head_bytes = target_head.numel() * target_head.element_size()
    _, needed = memory.model_bytes(drafter.parameters())  # this process's shards under FSDP
    gathered = sum(p.numel() * p.element_size() for p in drafter.parameters()) if sharded else 0
    moments = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    resident = memory.tensor_bytes([*drafter.parameters(), target_head, *moments])
    meter = memory.start_meter(tc.memory_budget_mb, device, resident_bytes=resident,
                               required_bytes=needed + gathered + head_bytes)
    peaks = [round(m["peak_mem_mb"] * memory.MB) for m in metrics if m.get("peak_mem_mb") is not None]  # bytes
    depths = plan.depths
    probe = _BudgetProbe(tc.time_budget_s_per_epoch, tc.budget_probe_steps, steps_per_epoch)

    def micro_steps(seqs: list[int], global_batch: int, epoch: int) -> tuple:
        """Forward and backward of ``seqs``, gradients scaled for a step of ``global_batch`` sequences.

        Returns the step's sums and, last, the last sequence's tensors: the caller drops them after
        the optimizer step, so that a step's measured peak memory holds them as it always has.
        """
        sup_total, loss_total, elements, tokens = 0, 0.0, 0, 0
        correct = torch.zeros(depths, dtype=torch.long)
        count = torch.zeros(depths, dtype=torch.long)
        rows = ex = layout = loss_t = stats = None
        for idx in seqs:
            rows = load_rows(dataset, idx, ctx, copy=device.type == "cpu")
            n = rows["input_ids"].shape[0]
            # Each sequence's loss is normalised by its own supervised count, then averaged.
            if not plan.parallel:
                with forward_ctx():
                    loss_t, stats = ttt_loss(drafter, target_head, {k: v.to(device) for k, v in rows.items()},
                                             plan.depths, plan.ttt_decay, tc.loss, tc.loss_chunk_rows)
                (loss_t / global_batch).backward()
                loss_total += float(loss_t.detach()) / global_batch
                n_sup, n_el = stats["supervised"], stats["elements"]
            else:
                layout = (cod_sample(n, tc.k_train, tc.retention, tc.retention_min,
                                     generator=_seq_generator(tc.seed, epoch, idx))
                          if plan.cod else full_grid(n, tc.k_train))
                ex = build_example(rows, layout, spec.mask_token_id)
                n_sup, n_el = int(ex.gate.sum()), len(layout)
                segments = segments_for(n, plan.partitions, plan.segment_rows)
                loss_sum, stats = parallel_backward(drafter, target_head, ex, lambda lay: masks(lay, n), segments,
                                                    tc.loss, tc.k_train, accum=global_batch,
                                                    chunk_rows=tc.loss_chunk_rows, forward_ctx=forward_ctx)
                loss_total += loss_sum / max(n_sup, 1) / global_batch
            sup_total += n_sup
            elements += n_el
            tokens += n
            correct += stats["correct"]
            count += stats["count"]
        return sup_total, loss_total, elements, tokens, correct, count, (rows, ex, layout, loss_t, stats)

    def distributed_micro_steps(batch: list[int], epoch: int) -> tuple:
        """This process's share of the global batch, then one all-reduce of the gradients and the
        step's statistics. A process that runs out of memory tells the others before the
        all-reduce, so that all of them stop at the same step (the main one records the OOM).
        FSDP gathers the weights first and reduces the gradients to the shards instead."""
        failed: BaseException | None = None
        if sharded:
            with meter.paused():  # a collective; the accountant cannot follow FSDP's in-place storages
                distributed.gather_params(drafter)
            meter.hold(gathered)  # past the budget, micro_steps' first op raises (all processes stop)
        try:
            acc = micro_steps(world.share(batch), len(batch), epoch)
        except BaseException as err:  # noqa: BLE001 -- only out-of-memory is caught, below
            if not memory.is_oom(err):
                raise
            failed, acc = err, None
        with meter.paused():
            oom = world.max([float(failed is not None), float(meter.peak_bytes() or 0)], device)
        if oom[0]:
            if failed is not None and world.is_main:
                raise failed
            if world.is_main:
                raise memory.BudgetExceeded(tc.memory_budget_mb, device.type, "another training process went over "
                                            "its budget at this step", peak_bytes=int(oom[1]), measure=meter.measure)
            raise _PeerStopped(f"stopped with the other processes at optimizer step {len(metrics) + 1}")
        if sharded:
            with meter.deferred():  # every process must finish the reduction
                distributed.reduce_grads(drafter)
            meter.hold(-gathered)
        else:
            world.sum_grads(params, comm_ctx=meter.paused)
        sup_total, loss_total, elements, tokens, correct, count, last = acc
        with meter.paused():
            summed = world.sum([sup_total, loss_total, elements, tokens, *correct.tolist(), *count.tolist()], device)
        return (int(summed[0]), summed[1], int(summed[2]), int(summed[3]),
                torch.tensor(summed[4:4 + depths]).round().long(), torch.tensor(summed[4 + depths:]).round().long(),
                last)

    def whole(state: dict[str, Any]) -> dict[str, Any]:
        """A state dict with whole tensors: FSDP's shards gathered (every process calls it)."""
        return distributed.full_tensors(state) if sharded else state

    t_run = time.perf_counter()
    for step in range(start_step, total_steps):
        epoch, j = divmod(step, steps_per_epoch)
        if j == 0 or step == start_step:
            order = shard_window_order(usable_shards, tc.seed, epoch, tc.shard_window)
        batch = [usable[i] for i in order[j * tc.grad_accum:(j + 1) * tc.grad_accum]]
        meter.reset_peak()
        t0 = time.perf_counter()
        if world.size == 1:
            acc = micro_steps(batch, len(batch), epoch)
        else:
            acc = distributed_micro_steps(batch, epoch)
        sup_total, loss_total, elements, tokens, correct, count, last = acc
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        peaks.append(meter.peak_bytes())
        row = {"step": step + 1, "epoch": epoch, "lr": sched.get_last_lr()[0], "loss": loss_total,
               "grad_norm": float(grad_norm), "supervised": sup_total, "elements": elements, "tokens": tokens,
               "step_s": dt, "tokens_per_s": tokens / dt, "elements_per_s": elements / dt,
               "peak_mem_mb": peaks[-1] / memory.MB}
        if getattr(drafter, "ntp_alpha", None) is not None:  # the regularized design's scale (Figure B)
            row["ntp_alpha"] = drafter.ntp_alpha.item()
        for d in range(depths):
            row[f"acc_d{d}"] = float(correct[d]) / int(count[d]) if count[d] else None
        metrics.append(row)
        if world.is_main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_total:.3f}", acc0=f"{row['acc_d0'] or 0:.2f}")
        # Drop the step's tensors now, not when the next step rebinds the names: a step's peak must
        # not depend on whether another ran before it in this process (a resumed run).
        acc = last = grad_norm = correct = count = None
        done = step + 1
        verdict = probe.observe(world.max([dt], device)[0])  # every process decides on the slowest
        if verdict is not None:
            bar.close()
            raise InfeasibleRun({"status": "infeasible", **verdict, "completed_steps": done,
                                 **meter.record(max(peaks))})
        if done % tc.checkpoint_every == 0 and done < total_steps and (world.is_main or sharded):
            with meter.paused():  # checkpoint copies are I/O, not training memory
                weights, opt_state = whole(drafter.state_dict()), whole(opt.state_dict())
                if world.is_main:
                    state = {"optimizer": opt_state, "scheduler": sched.state_dict(), "step": done}
                    ckpt.save_drafter(ckpt_root / f"step_{done:07d}", drafter, meta, trainer_state=state,
                                      tensors=weights)
                    for old in ckpt.list_checkpoints(ckpt_root)[:-tc.keep_checkpoints]:
                        shutil.rmtree(old, ignore_errors=True)
                weights = opt_state = None
        if stop_after_steps is not None and done >= stop_after_steps and done < total_steps:
            bar.close()
            raise _Killed(f"stopped after {done} steps (test hook)")
    bar.close()
    wall = time.perf_counter() - t_run
    memory.stop_meter()

    final_meta = {**meta, "optimizer_steps": total_steps, "sequences": len(usable), "epochs": tc.epochs}
    if world.size > 1:
        final_meta["world_size"] = world.size
    if sharded:
        final_meta["parallelism"] = "fsdp"
    weights = whole(drafter.state_dict())
    if not world.is_main:
        world.barrier()
        return {"status": "ok", "rank": world.rank}
    ckpt.save_drafter(out / "final", drafter, final_meta, tensors=weights)
    tail = metrics[-min(len(metrics), steps_per_epoch):]
    summary = {
        "status": "ok",
        **meter.record(max(peaks, default=None)),
        "time_budget_s_per_epoch": tc.time_budget_s_per_epoch,
        **final_meta,
        "drafter_layers": plan.num_layers,
        "wall_s_this_run": wall,
        "step_s_mean": _mean([m.get("step_s") for m in metrics]),
        "epoch_s_measured": _mean([m.get("step_s") for m in metrics]) * steps_per_epoch if metrics else None,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "last_epoch_loss": sum(m["loss"] for m in tail) / len(tail) if tail else None,
        "last_epoch_acc": {f"d{d}": _mean([m[f"acc_d{d}"] for m in tail]) for d in range(depths)},
        "tokens_per_s": _mean([m["tokens_per_s"] for m in metrics]),
    }
    atomic_write_json(out / "summary.json", summary)
    shutil.rmtree(ckpt_root, ignore_errors=True)
    log(f"done: loss {summary['final_loss']:.4f}, acc {summary['last_epoch_acc']}")
    world.barrier()
    return summary


class _BudgetProbe:
    """Projects the epoch time from the first optimizer steps of a run (the first is a warm-up).

    ``observe(step_s)`` returns None while the run may go on and a record of the measurement once
    the projection exceeds the budget. A run with too few steps to skip a warm-up uses them all.
    """

    def __init__(self, budget_s: float | None, probe_steps: int, steps_per_epoch: int) -> None:
        self.budget_s, self.steps_per_epoch = budget_s, steps_per_epoch
        self.skip = 1 if steps_per_epoch > probe_steps else 0
        self.probe_steps = min(probe_steps, steps_per_epoch - self.skip)
        self.times: list[float] = []
        self.seen = 0

    def observe(self, step_s: float) -> dict[str, Any] | None:
        self.seen += 1
        if self.budget_s is None or self.seen <= self.skip or len(self.times) >= self.probe_steps:
            return None
        self.times.append(step_s)
        if len(self.times) < self.probe_steps:
            return None
        step = sum(self.times) / len(self.times)
        projected = step * self.steps_per_epoch
        if projected <= self.budget_s:
            return None
        return {"time_budget_s_per_epoch": self.budget_s, "measured_step_s": step, "probe_steps": len(self.times),
                "steps_per_epoch": self.steps_per_epoch, "projected_epoch_s": projected}


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
