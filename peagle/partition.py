"""Sequence partitioning: gradient accumulation inside one super-sequence (paper §3.2, Alg. 1).

A super-sequence of n rows (its :class:`~peagle.cod.Layout` of L elements) is cut into S
segments of equal row width. Segment of an element:

* depth 0: its own position (anchor) -> ``floor(a * S / n)``;
* depth >= 1: the position of its chain's depth-1 element, ``a + 1`` -> ``floor((a + 1) * S / n)``.
  Chains are nested, so every element of a chain inherits the depth-1 element's segment
  (Algorithm 1's "depth g inherits from depth g - 1") and a chain is never split.

Segment s *owns* its elements; its forward pass runs over ``[context | owned]`` where the context
is every depth-0 element of an earlier segment (of a document an owned element belongs to). That
is exactly the set the owned elements can see, directly or through lower layers: under the mask
rule an element attends only depth-0 elements at or before its anchor and its own chain, and a
depth-0 element attends only earlier depth-0 elements. Depth-0 rows at or before an owned chain's
anchor a lie in segments <= seg(a + 1) = s, so owned activations equal the unpartitioned ones at
every layer. Context activations are recomputed (not cached) so gradients flow through them;
their loss is not charged. Losses are normalised by the supervised count of the WHOLE sequence,
so the segments' gradients sum to the unpartitioned gradient (up to float rounding).
"""

from __future__ import annotations

import operator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from peagle.cod import Layout
from peagle.losses import example_loss

__all__ = [
    "SegmentPlan",
    "check_partitions",
    "segments_for",
    "segment_of",
    "partition_layout",
    "segment_example",
    "partitioned_backward",
]


@dataclass(frozen=True)
class SegmentPlan:
    """One segment's forward pass: Ls = context + owned elements.

    segment: segment number s in [0, S).
    index: int64 [Ls], indices into the full layout, in layout order (grouped by depth, anchors
        increasing inside a depth), so ``layout`` below is a valid layout for the mask builders;
        context depth-0 rows precede the owned depth-0 rows.
    owned: bool [Ls], True for the segment's own elements (loss charged), False for context.
    layout: the sub-layout ``Layout(anchor[index], depth[index], doc[index])``.
    """

    segment: int
    index: torch.Tensor
    owned: torch.Tensor
    layout: Layout

    @property
    def num_owned(self) -> int:
        return int(self.owned.sum())

    @property
    def num_context(self) -> int:
        return int((~self.owned).sum())


def check_partitions(partitions: object, n: int) -> int:
    """Return ``partitions`` as an int; ValueError naming ``train.partitions`` unless 1 <= S <= n."""
    try:
        s = operator.index(partitions)  # type: ignore[arg-type]
    except TypeError:
        s = None
    if s is None or isinstance(partitions, bool) or s < 1:
        raise ValueError(f"train.partitions must be a positive integer, got {partitions!r}")
    if s > n:
        raise ValueError(
            f"train.partitions = {s} exceeds the number of rows of this sequence (n = {n}): every "
            f"segment needs at least one row; lower train.partitions to at most {n}"
        )
    return s


def segments_for(n: int, partitions: int, segment_rows: int | None) -> int:
    """How many segments a sequence of ``n`` rows is cut into: ``partitions``, or with
    ``segment_rows`` set only as many as keep each segment at most that many rows wide
    (``ceil(n / segment_rows)``, at most ``partitions``). Short sequences then train whole,
    where partitioning would only repeat the context's forward pass; the gradient is the same
    either way, so this changes time and memory, never the result."""
    if segment_rows is None:
        return partitions
    return max(1, min(partitions, -(-n // segment_rows)))


def segment_of(layout: Layout, n: int, partitions: int) -> torch.Tensor:
    """Segment of every element: int64 [L] in [0, S); -1 for padding (invalid) elements.

    Equal widths over the n rows: position p (anchor for depth 0, anchor + 1 for depth >= 1)
    goes to ``min(floor(p * S / n), S - 1)``. Monotone in p, so segment s covers a contiguous
    range of rows, and with S <= n every segment holds at least one depth-0 row.
    """
    s = check_partitions(partitions, n)
    pos = torch.where(layout.depth > 0, layout.anchor + 1, layout.anchor)
    v = layout.valid
    if bool(v.any()):
        pv = pos[v]
        if int(pv.min()) < 0 or int(pv.max()) > n - 1:
            raise ValueError(f"layout has elements outside the {n} rows (anchor < 0 or anchor + depth > {n - 1})")
    seg = torch.clamp(torch.div(pos * s, n, rounding_mode="floor"), 0, s - 1)
    return torch.where(v, seg, torch.full_like(seg, -1))


def partition_layout(layout: Layout, n: int, partitions: int) -> list[SegmentPlan]:
    """Split ``layout`` (n rows) into S :class:`SegmentPlan` s, in segment order.

    Every valid element is owned by exactly one segment; padding (valid False) is in none (it
    attends nothing, so it must not be supervised anyway). Context of segment s = valid depth-0 elements of segments < s whose document
    also appears among segment s's owned elements (other documents are invisible to them).
    """
    seg = segment_of(layout, n, partitions)
    s_count = check_partitions(partitions, n)
    depth0 = (layout.depth == 0) & layout.valid
    plans = []
    for s in range(s_count):
        owned = seg == s
        docs = torch.unique(layout.doc[owned])
        context = depth0 & (seg >= 0) & (seg < s) & torch.isin(layout.doc, docs)
        index = (owned | context).nonzero().squeeze(-1)
        sub = Layout(layout.anchor[index], layout.depth[index], layout.doc[index])
        plans.append(SegmentPlan(segment=s, index=index, owned=owned[index], layout=sub))
    return plans


def segment_example(ex: Any, plan: SegmentPlan) -> Any:
    """The :class:`peagle.example.Example` restricted to ``plan``'s elements, gate off on context.

    Every per-element tensor [L, ...] becomes [Ls, ...]; ``num_rows`` stays the whole sequence's n.
    """
    idx = plan.index.to(ex.input_ids.device)
    return replace(
        ex,
        input_ids=ex.input_ids[idx],
        hidden=ex.hidden[idx],
        is_mask=ex.is_mask[idx],
        positions=ex.positions[idx],
        target_hidden=ex.target_hidden[idx],
        gate=ex.gate[idx] & plan.owned.to(ex.gate.device),
        layout=plan.layout,
    )


def partitioned_backward(
    drafter: torch.nn.Module,
    target_head: torch.Tensor,
    ex: Any,
    mask_fn: Callable[[Layout], torch.Tensor],
    partitions: int,
    kind: str,
    k: int,
    n_sup_total: int,
    scale: float = 1.0,
    chunk_rows: int | None = None,
    forward_ctx: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[float, dict[str, torch.Tensor]]:
    """Forward + backward of one example segment by segment; gradients accumulate in ``.grad``.

    Segment s backpropagates ``loss_s * scale / max(n_sup_total, 1)``, where loss_s is the loss
    summed over its owned supervised elements (:func:`peagle.losses.example_loss`), so the total
    gradient equals that of ``example_loss(...) * scale / max(n_sup_total, 1)`` on the whole
    example. Each segment's graph is freed before the next one is built, so peak activation and
    attention memory is that of the largest segment's [context + owned] elements.

    mask_fn: sub-layout -> bool mask [Ls, Ls] (the configured realisation, e.g.
        ``lambda lay: mask_builder(lay, n)``), called once per segment.
    Returns (summed loss over all supervised elements as a float -- the same quantity as
    ``example_loss``'s first output --, stats with per-depth ``correct`` and ``count`` [k]).
    Segments without a supervised owned element contribute nothing and are skipped.
    chunk_rows: see :func:`peagle.losses.head_loss`. forward_ctx: entered around each segment's
    forward and loss (mixed precision), not its backward.
    """
    plans = partition_layout(ex.layout, ex.num_rows, partitions)
    total = 0.0
    correct = torch.zeros(k, dtype=torch.long)
    count = torch.zeros(k, dtype=torch.long)
    norm = scale / max(n_sup_total, 1)
    for plan in plans:
        sub = segment_example(ex, plan)
        if not bool(sub.gate.any()):
            continue
        with forward_ctx():
            loss, stats = example_loss(drafter, target_head, sub, mask_fn(plan.layout), kind, k, chunk_rows)
        (loss * norm).backward()
        total += float(loss.detach())
        correct += stats["correct"]
        count += stats["count"]
    return total, {"correct": correct, "count": count}
