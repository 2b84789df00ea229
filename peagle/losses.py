"""The drafter's training loss (DESIGN §4): forward KL to the target's next-token distribution (or
cross-entropy on its argmax) through the LM heads, chunked over rows, with per-depth accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from peagle.drafters import PEagleDrafter
from peagle.example import Example

__all__ = ["distill_loss", "head_loss", "depth_stats", "example_loss"]


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


def _head_loss_chunk(hidden: torch.Tensor, head_w: torch.Tensor, target_hidden: torch.Tensor,
                     target_head: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    draft_logits = hidden @ head_w.T
    with torch.no_grad():
        target_logits = target_hidden.to(target_head.dtype) @ target_head.T
        hit = (draft_logits.argmax(-1) == target_logits.argmax(-1)).long()
    return distill_loss(draft_logits, target_logits, kind), hit


def head_loss(hidden: torch.Tensor, head_w: torch.Tensor, target_hidden: torch.Tensor, target_head: torch.Tensor,
              kind: str, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and per-row hits of drafter states hidden [M, H] vs target states [M, H].

    head_w [V, H] is the drafter's LM head, target_head [V, H] the target's. With M > chunk_rows,
    rows go through the heads in chunks whose [chunk, V] logits are recomputed in the backward
    pass instead of kept: at the paper's 201K vocabulary, 34K elements would otherwise hold
    ~27 GB of logits. Same loss and gradient either way (tests/test_train.py).
    """
    m = hidden.shape[0]
    if chunk_rows is None or m <= chunk_rows:
        return _head_loss_chunk(hidden, head_w, target_hidden, target_head, kind)
    from torch.utils.checkpoint import checkpoint

    losses, hits = [], []
    for lo in range(0, m, chunk_rows):
        sl = slice(lo, lo + chunk_rows)
        loss, hit = checkpoint(_head_loss_chunk, hidden[sl], head_w, target_hidden[sl], target_head, kind,
                               use_reentrant=False)
        losses.append(loss)
        hits.append(hit)
    return torch.stack(losses).sum(), torch.cat(hits)


def depth_stats(depth: torch.Tensor, hit: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per-depth ``correct`` and ``count`` [k] from element depths [M] and hits [M]."""
    depth, hit = depth.cpu(), hit.cpu()
    return {"correct": torch.zeros(k, dtype=torch.long).index_add_(0, depth, hit),
            "count": torch.bincount(depth, minlength=k)[:k]}


def example_loss(drafter: PEagleDrafter, target_head: torch.Tensor, ex: Example, mask: torch.Tensor,
                 kind: str, k: int, chunk_rows: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss summed over the supervised elements of one example, plus per-depth accuracy counts."""
    dev = target_head.device
    hidden = drafter.forward_hidden(
        ex.input_ids[None].to(dev), ex.hidden[None].to(dev), ex.is_mask[None].to(dev),
        ex.positions[None].to(dev), mask[None].to(dev), depths=ex.layout.depth[None].to(dev),
    )[0]
    sel = ex.gate.nonzero().squeeze(-1).to(dev)
    loss, hit = head_loss(hidden[sel], drafter.lm_head.weight, ex.target_hidden.to(dev)[sel], target_head,
                          kind, chunk_rows)
    return loss, depth_stats(ex.layout.depth.to(dev)[sel], hit, k)
