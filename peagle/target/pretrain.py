"""Packed next-token pretraining of the tiny target and its held-out accuracy."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from peagle.io import atomic_dir, atomic_write_json, atomic_write_text
from peagle.target.chat import render_training_example
from peagle.target.tokenizer import save_tokenizer

# What a given config and data pretrain into also depends on this code (tokenizer training,
# packing, the optimiser): bump the version whenever a change here alters the weights, so that
# recorded targets (peagle.target.recorded) made by older code are rebuilt, not reused.
RECIPE_VERSION = 2

def _to_token_sequences(tokenizer, items: Sequence[Any]) -> tuple[list[list[int]], list[int], int]:
    """Normalise pretraining inputs to token sequences + prompt lengths (0 = no prompt part).

    Accepts token-id lists, plain strings (rendered as ``bos + text + eos``) or prompt records.
    Returns ``(seqs, prompt_lens, n_skipped_without_reference)``.
    """
    seqs: list[list[int]] = []
    plens: list[int] = []
    skipped = 0
    for it in items:
        if isinstance(it, str):
            ids = tokenizer(it, add_special_tokens=False)["input_ids"]
            seqs.append([int(tokenizer.bos_token_id)] + list(ids) + [int(tokenizer.eos_token_id)])
            plens.append(0)
        elif isinstance(it, (list, tuple)) and (not it or isinstance(it[0], int)):
            seqs.append([int(i) for i in it])
            plens.append(0)
        else:
            r = render_training_example(tokenizer, it)
            if r is None:
                skipped += 1
                continue
            seqs.append(r[0])
            plens.append(r[1])
    return seqs, plens, skipped


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "cosine":
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - frac)
        if schedule == "constant":
            return 1.0
        raise ValueError(f"unknown lr schedule {schedule!r}; use cosine, linear or constant")
    return f


def pack_sequences(seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], seq_len: int,
                   response_only_loss: bool = False, pad_id: int = 0):
    """Pack whole documents, in order, into blocks of ``seq_len`` tokens.

    Returns ``(input_ids [nb, seq_len], position_ids [nb, seq_len], labels [nb, seq_len])`` int64.
    A document that does not fit in the current block starts the next one, so no document is split
    across blocks: a continuation block would train the answer without its prompt in view (a list
    item or a name the answer must copy), which teaches the target to make them up. Documents
    longer than ``seq_len`` are truncated to it (raise ``seq_len``); the rest of a block is padding
    (``pad_id``, label -100). Position ids restart at 0 on every document, which makes
    transformers 5 mask attention per document (packed-sequence detection when ``attention_mask``
    is None); labels are -100 at a document start (predicting it from the previous document is
    meaningless) and, with ``response_only_loss``, on prompt tokens.
    """
    import torch

    blocks: list[tuple[list[int], list[int], list[int]]] = []
    ids: list[int] = []
    pos: list[int] = []
    lab: list[int] = []

    def close() -> None:
        pad = seq_len - len(ids)
        blocks.append((ids + [pad_id] * pad, pos + list(range(pad)), lab + [-100] * pad))

    for s, pl in zip(seqs, prompt_lens):
        s = list(s)[:seq_len]
        if ids and len(ids) + len(s) > seq_len:
            close()
            ids, pos, lab = [], [], []
        ids.extend(s)
        pos.extend(range(len(s)))
        lab.extend(-100 if j == 0 or (response_only_loss and j < pl) else int(t) for j, t in enumerate(s))
    if ids:
        close()
    if not blocks:
        raise ValueError("pretraining data is empty; add data")
    as_t = lambda i: torch.tensor([b[i] for b in blocks], dtype=torch.long)  # noqa: E731
    return as_t(0), as_t(1), as_t(2)


def teacher_forced(model, tokenizer, records: Sequence[Any], *, max_records: int | None = None,
                   max_len: int | None = None):
    """Yield ``(prompt ids, response ids, logits [len(response), V])`` per record with a reference:
    one forward over ``chat(prompt) + reference + eos`` (cut to ``max_len``), ``logits[i]``
    predicting response token ``i``. At most ``max_records`` records; no gradients."""
    import torch

    device = next(model.parameters()).device
    n_rec = 0
    with torch.no_grad():
        for rec in records:
            if max_records is not None and n_rec >= max_records:
                return
            r = render_training_example(tokenizer, rec)
            if r is None:
                continue
            ids, pl = r
            if max_len is not None:
                ids = ids[:max_len]
            if len(ids) <= pl:
                continue
            logits = model(input_ids=torch.tensor([ids], dtype=torch.long, device=device),
                           use_cache=False).logits[0].float()
            n_rec += 1
            yield ids[:pl], ids[pl:], logits[pl - 1: len(ids) - 1]


def evaluate_next_token_accuracy(model, tokenizer, records: Sequence[Any], *,
                                 max_records: int | None = 64,
                                 max_len: int | None = None) -> dict[str, Any]:
    """Greedy next-token accuracy and mean NLL of ``model`` on the response (reference + eos)
    tokens of ``records`` that have a reference; the prompt only conditions."""
    import torch

    n_rec = correct = total = 0
    nll = 0.0
    was_training = model.training
    model.eval()
    for _, response, logits in teacher_forced(model, tokenizer, records, max_records=max_records, max_len=max_len):
        tgt = torch.tensor(response, device=logits.device)
        correct += int((logits.argmax(-1) == tgt).sum())
        nll += float(torch.nn.functional.cross_entropy(logits, tgt, reduction="sum"))
        total += len(response)
        n_rec += 1
    model.train(was_training)
    return {"heldout_next_token_accuracy": (correct / total) if total else None,
            "heldout_loss": (nll / total) if total else None,
            "heldout_tokens": total, "heldout_records": n_rec}


def pretrain_tiny_target(model, tokenizer, train: Sequence[Any], eval_records: Sequence[Any], *,
                         steps: int, seq_len: int, batch_size: int, lr: float, warmup: int,
                         seed: int = 0, out_dir: str | Path | None = None,
                         log: Callable[[dict], None] | str | Path | None = None,
                         weight_decay: float = 0.1, schedule: str = "cosine",
                         min_lr_ratio: float = 0.1, grad_clip: float = 1.0,
                         response_only_loss: bool = False, num_threads: int | None = None,
                         log_every: int = 10, eval_max_records: int | None = 64,
                         progress: bool = True) -> dict[str, Any]:
    """Next-token pretraining of ``model`` in place (fp32, AdamW, warm-up then decay).

    ``train``: prompt records (rendered ``chat(prompt) + reference + eos``), plain strings or
    token-id lists. Sequences are packed into ``[batch_size, seq_len]`` blocks with per-document
    attention (see ``pack_sequences``); blocks are visited in a seeded random order, epoch by
    epoch. ``log`` is a callable receiving one dict per ``log_every`` steps, or a JSONL path.
    If ``out_dir`` is given, model + tokenizer are saved to ``out_dir/model`` (atomically) and the
    metrics to ``out_dir/pretrain_metrics.json``. Returns the metrics dict (incl.
    ``heldout_next_token_accuracy`` on the eval records' reference tokens).
    """
    import torch
    from tqdm.auto import tqdm

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    for name, v in (("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"pretrain_tiny_target: {name}={v} must be >= 1")
    max_pos = int(getattr(model.config, "max_position_embeddings", 1 << 30))
    seqs, plens, skipped = _to_token_sequences(tokenizer, train)
    truncated = sum(len(s) > min(max_pos, seq_len) for s in seqs)
    seqs = [s[:max_pos] for s in seqs]
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    input_ids, position_ids, labels = pack_sequences(seqs, plens, seq_len, response_only_loss, pad_id)
    nb = input_ids.shape[0]
    device = next(model.parameters()).device

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(warmup, steps, schedule, min_lr_ratio))

    log_records: list[dict] = []
    log_fn = log if callable(log) else None
    order = torch.randperm(nb, generator=gen)
    cursor = 0
    epochs = 0
    losses: list[float] = []
    tokens_seen = 0
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain target", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    ema = None
    for step in bar:
        idx = []
        while len(idx) < batch_size:
            if cursor >= nb:
                order = torch.randperm(nb, generator=gen)
                cursor = 0
                epochs += 1
            take = min(batch_size - len(idx), nb - cursor)
            idx.extend(order[cursor:cursor + take].tolist())
            cursor += take
        ix = torch.tensor(idx)
        out = model(input_ids=input_ids[ix].to(device), position_ids=position_ids[ix].to(device),
                    labels=labels[ix].to(device), use_cache=False)
        loss = out.loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss became {loss.item()} at step {step}; "
                                     f"lower target.pretrain.lr (now {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        lv = float(loss.detach())
        losses.append(lv)
        tokens_seen += batch_size * seq_len
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if step % log_every == 0 or step == steps - 1:
            el = time.perf_counter() - t0
            rec = {"step": step, "loss": lv, "loss_ema": ema, "lr": sched.get_last_lr()[0],
                   "tokens": tokens_seen, "tokens_per_s": tokens_seen / max(el, 1e-9)}
            log_records.append(rec)
            if log_fn:
                log_fn(rec)
            bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    bar.close()
    wall = time.perf_counter() - t0
    model.eval()
    k = max(1, min(10, len(losses)))
    metrics: dict[str, Any] = {
        "steps": steps, "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "warmup": warmup,
        "schedule": schedule, "seed": seed, "num_parameters": count_parameters(model),
        "train_sequences": len(seqs), "train_skipped_without_reference": skipped,
        "train_truncated": truncated, "train_tokens_available": sum(min(len(x), seq_len) for x in seqs),
        "num_blocks": nb, "epochs": epochs + cursor / nb, "tokens_seen": tokens_seen,
        "train_loss_first": sum(losses[:k]) / k, "train_loss_last": sum(losses[-k:]) / k,
        "wall_s": wall, "tokens_per_s": tokens_seen / max(wall, 1e-9),
        "threads": torch.get_num_threads(),
    }
    metrics.update(evaluate_next_token_accuracy(model, tokenizer, eval_records,
                                                max_records=eval_max_records, max_len=max_pos))
    if isinstance(log, (str, Path)):
        atomic_write_text(log, "".join(json.dumps(r) + "\n" for r in log_records))
    if out_dir is not None:
        out_dir = Path(out_dir)
        save_target_model(model, tokenizer, out_dir / "model")
        atomic_write_json(out_dir / "pretrain_metrics.json", metrics)
    return metrics


def save_target_model(model, tokenizer, model_dir: str | Path) -> None:
    """``save_pretrained`` model + tokenizer into ``model_dir`` atomically (safetensors)."""
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        # transformers 5 writes rope_parameters/dtype only; older readers (vLLM envs on
        # transformers 4.x) look for rope_theta/torch_dtype and would silently use defaults.
        rp = cfg.get("rope_parameters") or {}
        if "rope_theta" not in cfg and "rope_theta" in rp:
            cfg["rope_theta"] = rp["rope_theta"]
        if "torch_dtype" not in cfg and "dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
        atomic_write_json(cfg_path, cfg)
