"""One parallel training step on one example: forward and backward, whole or in segments.

The trainer's loop (:mod:`peagle.train`) and the benchmarks (``peagle.bench``) call this one
function, so what they time and measure is the step that trains the drafters.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable

import torch

from peagle.cod import Layout
from peagle.example import Example
from peagle.losses import example_loss
from peagle.partition import partitioned_backward

__all__ = ["parallel_backward"]


def parallel_backward(drafter: torch.nn.Module, target_head: torch.Tensor, ex: Example,
                      mask_fn: Callable[[Layout], Any], segments: int, kind: str, k: int, *,
                      accum: int = 1, chunk_rows: int | None = None,
                      forward_ctx: Callable[[], AbstractContextManager] = nullcontext,
                      ) -> tuple[float, dict[str, torch.Tensor]]:
    """Backpropagate ``loss / max(n_sup, 1) / accum`` of one example; gradients accumulate in ``.grad``.

    ``loss`` is summed over the example's n_sup supervised elements (:func:`peagle.losses.example_loss`),
    so each sequence weighs the same whatever its length and ``accum`` sequences make one optimizer
    step. ``segments`` > 1 runs the example segment by segment (paper §3.2,
    :func:`peagle.partition.partitioned_backward`): the same gradient at a lower peak memory.
    ``mask_fn``: (sub-)layout -> its mask, e.g. ``lambda lay: mask_builder(lay, n)``.
    ``forward_ctx``: entered around each forward and loss, not the backward (mixed precision:
    ``lambda: torch.autocast(...)``).
    Returns (the summed loss as a float, per-depth ``correct`` and ``count`` [k]).
    """
    n_sup = int(ex.gate.sum())
    if segments > 1:
        return partitioned_backward(drafter, target_head, ex, mask_fn, segments, kind, k, n_sup, 1 / accum,
                                    chunk_rows=chunk_rows, forward_ctx=forward_ctx)
    with forward_ctx():
        loss, stats = example_loss(drafter, target_head, ex, mask_fn(ex.layout), kind, k, chunk_rows)
    (loss / max(n_sup, 1) / accum).backward()
    return float(loss.detach()), stats
