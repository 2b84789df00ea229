"""P-EAGLE drafter training (DESIGN §3-4): COD super-sequences, cross-depth mask, forward KL.

One training sequence is one micro-batch (the paper's recipe: micro-batch 1, gradient
accumulation over sequences). The data order, every COD sample and the initial weights are
functions of the seed alone, so a run killed and resumed from a checkpoint ends where an
uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from peagle import checkpoint as ckpt
from peagle import memory
from peagle.attention import ElementMeta
from peagle.cod import Layout, cod_sample
from peagle.config import Config
from peagle.drafters import DrafterSpec, PEagleDrafter, build_drafter, num_parameters
from peagle.masks import AmortizedMask, pard_mask, reference_mask
from peagle.partition import partitioned_backward

METHODS = ("peagle",)


class TrainingError(ValueError):
    """Bad training input: mismatched hidden states, nothing to train on, unknown method."""


# --------------------------------------------------------------------------- examples


@dataclass
class Example:
    """One super-sequence, ready for the drafter (L elements, H hidden size)."""

    input_ids: torch.Tensor  # [L] real token at depth 0, mask token above
    hidden: torch.Tensor  # [L, 3H] target features of the anchor row (unused for mask slots)
    is_mask: torch.Tensor  # [L] bool
    positions: torch.Tensor  # [L] anchor + depth
    target_hidden: torch.Tensor  # [L, H] target's final hidden state whose LM head gives z
    gate: torch.Tensor  # [L] bool, supervised elements
    layout: Layout
    num_rows: int  # n, real tokens of the sequence


def build_example(rows: dict[str, torch.Tensor], layout: Layout, mask_token_id: int) -> Example:
    """Gather the per-element inputs and targets of ``layout`` from shifted rows.

    Element (a, d) reads row a's token and features when d == 0, is a mask slot otherwise, sits at
    position a + d, and is trained towards the target distribution of row a + d (DESIGN §3).
    """
    anchor, depth = layout.anchor, layout.depth
    is_mask = depth > 0
    target_row = anchor + depth
    input_ids = torch.where(is_mask, torch.full_like(anchor, mask_token_id), rows["input_ids"][anchor])
    return Example(
        input_ids=input_ids,
        hidden=rows["aux_hidden"][anchor],
        is_mask=is_mask,
        positions=target_row,
        target_hidden=rows["target_hidden"][target_row],
        gate=rows["loss_mask"][target_row].bool(),
        layout=layout,
        num_rows=int(rows["input_ids"].shape[0]),
    )


def truncate(seq: dict[str, torch.Tensor], ctx: int) -> dict[str, torch.Tensor]:
    """Keep the first ``ctx`` tokens of a stored sequence (the training context length)."""
    return {k: v[:ctx] for k, v in seq.items()}


class MaskBuilder:
    """The configured realisation of the cross-depth mask; all give the same attention.

    amortized/pard/reference return a dense bool [L, L] mask; maskfree returns an
    :class:`~peagle.attention.ElementMeta` (per-element tensors, no [L, L] mask).
    """

    def __init__(self, strategy: str, max_len: int, k: int) -> None:
        self.strategy = strategy
        self.k = k
        if strategy == "amortized":
            self._amortized = AmortizedMask(max_len, k)
        elif strategy not in ("pard", "reference", "maskfree"):
            raise TrainingError(f"unknown mask strategy {strategy!r} (config train.mask_strategy): "
                                "use amortized, pard, reference or maskfree")

    def __call__(self, layout: Layout, n: int) -> torch.Tensor | ElementMeta:
        if self.strategy == "maskfree":
            return ElementMeta.from_layout(layout)
        if self.strategy == "amortized":
            return self._amortized.get(layout)
        if self.strategy == "pard":
            return pard_mask(layout, n, self.k)
        return reference_mask(layout)


# --------------------------------------------------------------------------- loss


def distill_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed per-element loss over M supervised elements; logits [M, V] -> scalar.

    ``kl``: forward KL(target || draft) (DESIGN §4); ``ce``: cross-entropy on the target's argmax.
    """
    # Half precision is upcast to fp32 for the softmax; float64 stays float64 (exactness tests).
    up = torch.promote_types(draft_logits.dtype, torch.float32)
    logq = F.log_softmax(draft_logits.to(up), dim=-1)
    if kind == "ce":
        return F.nll_loss(logq, target_logits.argmax(-1), reduction="sum")
    logp = F.log_softmax(target_logits.to(up), dim=-1)
    return (logp.exp() * (logp - logq)).sum()


def example_loss(drafter: PEagleDrafter, target_head: torch.Tensor, ex: Example, mask: torch.Tensor,
                 kind: str, k: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss summed over the supervised elements of one example, plus per-depth accuracy counts."""
    dev = target_head.device
    hidden = drafter.forward_hidden(
        ex.input_ids[None].to(dev), ex.hidden[None].to(dev), ex.is_mask[None].to(dev),
        ex.positions[None].to(dev), mask[None].to(dev),
    )[0]
    sel = ex.gate.nonzero().squeeze(-1).to(dev)
    draft_logits = drafter.lm_head(hidden[sel])
    with torch.no_grad():
        target_logits = ex.target_hidden.to(dev)[sel].to(target_head.dtype) @ target_head.T
    loss = distill_loss(draft_logits, target_logits, kind)
    depth = ex.layout.depth.to(dev)[sel]
    hit = (draft_logits.argmax(-1) == target_logits.argmax(-1)).long()
    stats = {
        "correct": torch.zeros(k, dtype=torch.long).index_add_(0, depth.cpu(), hit.cpu()),
        "count": torch.bincount(depth.cpu(), minlength=k),
    }
    return loss, stats


# --------------------------------------------------------------------------- run state


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux: the process's peak resident set.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _seq_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 100_003 + index)


def epoch_order(num: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(num, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then linear decay to 0 at ``total`` optimizer steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


class _Killed(RuntimeError):
    """Raised by ``stop_after_steps`` to simulate a killed run in tests."""


def _write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main entry


@memory.reports_oom  # an OOM under train.memory_budget_mb -> summary.json status OOM
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
    """Train one drafter; resumes from ``out_dir/checkpoints`` if a checkpoint is there.

    Writes ``out_dir/final`` (vLLM-loadable), ``out_dir/metrics.jsonl`` (one line per optimizer
    step) and ``out_dir/summary.json``; returns the summary.
    """
    from peagle.hidden import HiddenStateDataset, shifted_rows
    from peagle.target import load_target

    if method not in METHODS:
        raise TrainingError(f"unknown method {method!r}: available {', '.join(METHODS)}")
    if ctx < 3:
        raise TrainingError(f"training context length {ctx} is too short (need >= 3 tokens)")
    tc, dc = cfg.train, cfg.drafter
    torch.set_num_threads(cfg.runtime.threads)
    device = torch.device(cfg.runtime.device)
    dtype = getattr(torch, cfg.runtime.dtype)
    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)

    dataset = HiddenStateDataset(hidden_dir)
    target, _tok, info = load_target(target_json, device="cpu", dtype=torch.float32)
    if list(dataset.aux_layer_ids) != list(info["aux_layer_ids"]):
        raise TrainingError(f"{hidden_dir}: hidden states were extracted at layers {dataset.aux_layer_ids} "
                            f"but {target_json} says {info['aux_layer_ids']}; re-run extraction")
    if dataset.hidden_size != info["hidden_size"]:
        raise TrainingError(f"{hidden_dir}: hidden size {dataset.hidden_size} != target's {info['hidden_size']}")
    embed = target.get_input_embeddings().weight.detach().clone()
    head = target.get_output_embeddings().weight.detach().clone()
    del target

    h = info["hidden_size"]
    head_dim = dc.head_dim or h // dc.num_heads
    spec = DrafterSpec(
        hidden_size=h, vocab_size=head.shape[0], num_layers=dc.num_layers, num_heads=dc.num_heads,
        num_kv_heads=dc.num_kv_heads, head_dim=head_dim, intermediate_size=dc.intermediate_size,
        mask_token_id=int(info["mask_token_id"]), aux_layer_ids=list(info["aux_layer_ids"]),
        rms_norm_eps=dc.rms_norm_eps, rope_theta=dc.rope_theta,
        max_position_embeddings=max(ctx + tc.k_train, int(info.get("max_position_embeddings") or 0)),
    )
    drafter = build_drafter(spec, embed=embed, lm_head=head, seed=tc.seed).to(device=device, dtype=dtype)
    drafter.embed_tokens.weight.requires_grad_(dc.embed_trainable)
    drafter.lm_head.weight.requires_grad_(dc.lm_head_trainable)
    target_head = head.to(device=device, dtype=dtype)
    if tc.mask_strategy == "amortized" and ctx - 1 > tc.max_mask_len:
        # Fail before any work rather than at the first long sequence.
        raise TrainingError(f"training context {ctx} needs a precomputed mask of {ctx - 1} positions, but "
                            f"train.max_mask_len is {tc.max_mask_len}; raise it to at least {ctx - 1}")
    masks = MaskBuilder(tc.mask_strategy, tc.max_mask_len, tc.k_train)

    # Sequences with at least one supervised row inside the context window.
    usable, shortest = [], None
    for i in range(len(dataset)):
        seq = truncate(dataset[i], ctx)
        if seq["input_ids"].shape[0] >= 2 and bool(seq["loss_mask"][1:].any()):
            usable.append(i)
            rows = seq["input_ids"].shape[0] - 1
            shortest = rows if shortest is None else min(shortest, rows)
    if not usable:
        raise TrainingError(f"{hidden_dir}: no sequence has a supervised token within the first {ctx} tokens")
    if tc.partitions > shortest:
        # Checked up front so that a run never stops halfway at the first short sequence.
        raise TrainingError(f"train.partitions={tc.partitions} exceeds the {shortest} rows of the shortest "
                            f"training sequence at ctx={ctx}; use at most {shortest} partitions")
    steps_per_epoch = math.ceil(len(usable) / tc.grad_accum)
    total_steps = tc.epochs * steps_per_epoch
    warmup = max(1, math.ceil(tc.warmup_ratio * total_steps))

    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, warmup))

    meta = {"method": method, "ctx": ctx, "k_train": tc.k_train, "retention": tc.retention,
            "retention_min": tc.retention_min, "loss": tc.loss, "mask_strategy": tc.mask_strategy,
            "partitions": tc.partitions,
            "target": info["path"], "target_name": info.get("name"), "seed": tc.seed}
    metrics_path = out / "metrics.jsonl"
    start_step, metrics = 0, []
    existing = ckpt.list_checkpoints(ckpt_root)
    if existing:
        last = existing[-1]
        state = ckpt.load_trainer_state(last)
        resumed, _ = ckpt.load_drafter(last, device=device, dtype=dtype)
        drafter.load_state_dict(resumed.state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_step = state["step"]
        if metrics_path.exists():
            metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            metrics = [m for m in metrics if m["step"] <= start_step]
        log(f"resuming from {last} at optimizer step {start_step}/{total_steps}")
    _write_jsonl_atomic(metrics_path, metrics)

    log(f"training {method} ctx={ctx}: {len(usable)} sequences, {total_steps} optimizer steps, "
        f"{num_parameters(drafter) / 1e6:.2f}M params, mask={tc.mask_strategy}")
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not progress, desc=f"{method} ctx={ctx}",
               file=sys.stderr, dynamic_ncols=True)
    drafter.train()
    # Budget the loop (gradients, optimizer moments, activations); the weights already exist.
    head_bytes = target_head.numel() * target_head.element_size()
    weights, needed = memory.model_bytes(drafter.parameters())
    memory.cap_memory(tc.memory_budget_mb, device, resident_bytes=weights + head_bytes,
                      required_bytes=needed + head_bytes)
    t_run = time.perf_counter()
    for step in range(start_step, total_steps):
        epoch, j = divmod(step, steps_per_epoch)
        order = epoch_order(len(usable), tc.seed, epoch)
        batch = [usable[i] for i in order[j * tc.grad_accum:(j + 1) * tc.grad_accum]]
        t0 = time.perf_counter()
        sup_total, loss_total, elements, tokens = 0, 0.0, 0, 0
        correct = torch.zeros(tc.k_train, dtype=torch.long)
        count = torch.zeros(tc.k_train, dtype=torch.long)
        for idx in batch:
            rows = shifted_rows(truncate(dataset[idx], ctx))
            n = rows["input_ids"].shape[0]
            layout = cod_sample(n, tc.k_train, tc.retention, tc.retention_min,
                                generator=_seq_generator(tc.seed, epoch, idx))
            ex = build_example(rows, layout, spec.mask_token_id)
            n_sup = int(ex.gate.sum())
            # Each sequence's loss is normalised by its own supervised count, then averaged.
            if tc.partitions > 1:
                # Forward+backward segment by segment (paper §3.2): same gradient, less memory.
                loss_sum, stats = partitioned_backward(drafter, target_head, ex, lambda lay: masks(lay, n),
                                                       tc.partitions, tc.loss, tc.k_train, n_sup, 1 / len(batch))
            else:
                loss_t, stats = example_loss(drafter, target_head, ex, masks(layout, n), tc.loss, tc.k_train)
                (loss_t / max(n_sup, 1) / len(batch)).backward()
                loss_sum = float(loss_t.detach())
            loss_total += loss_sum / max(n_sup, 1) / len(batch)
            sup_total += n_sup
            elements += len(layout)
            tokens += n
            correct += stats["correct"]
            count += stats["count"]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        row = {"step": step + 1, "epoch": epoch, "lr": sched.get_last_lr()[0], "loss": loss_total,
               "grad_norm": float(grad_norm), "supervised": sup_total, "elements": elements, "tokens": tokens,
               "tokens_per_s": tokens / dt, "elements_per_s": elements / dt,
               "peak_mem_mb": _peak_memory_mb(device)}
        for d in range(tc.k_train):
            row[f"acc_d{d}"] = float(correct[d]) / int(count[d]) if count[d] else None
        metrics.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_total:.3f}", acc0=f"{row['acc_d0'] or 0:.2f}")
        done = step + 1
        if done % tc.checkpoint_every == 0 and done < total_steps:
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": done}
            ckpt.save_drafter(ckpt_root / f"step_{done:07d}", drafter, meta, trainer_state=state)
            for old in ckpt.list_checkpoints(ckpt_root)[:-tc.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        if stop_after_steps is not None and done >= stop_after_steps and done < total_steps:
            bar.close()
            raise _Killed(f"stopped after {done} steps (test hook)")
    bar.close()
    wall = time.perf_counter() - t_run
    memory.release_cap()

    final_meta = {**meta, "optimizer_steps": total_steps, "sequences": len(usable), "epochs": tc.epochs}
    ckpt.save_drafter(out / "final", drafter, final_meta)
    tail = metrics[-min(len(metrics), steps_per_epoch):]
    summary = {
        "status": "ok",
        "budget_mb": tc.memory_budget_mb,
        **final_meta,
        "wall_s_this_run": wall,
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "last_epoch_loss": sum(m["loss"] for m in tail) / len(tail) if tail else None,
        "last_epoch_acc": {f"d{d}": _mean([m[f"acc_d{d}"] for m in tail]) for d in range(tc.k_train)},
        "tokens_per_s": _mean([m["tokens_per_s"] for m in metrics]),
        "peak_mem_mb": max((m["peak_mem_mb"] for m in metrics), default=None),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(ckpt_root, ignore_errors=True)
    log(f"done: loss {summary['final_loss']:.4f}, acc {summary['last_epoch_acc']}")
    return summary


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
