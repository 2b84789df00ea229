"""One training example of a parallel drafter (DESIGN §3): a sequence's shifted rows gathered into
a super-sequence of COD-sampled (or full-grid) elements, and the cross-depth mask realisation it
trains under. Library code for the trainer (:mod:`peagle.train`), the partitioner and the
benchmarks alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peagle.attention import ElementMeta
from peagle.cod import Layout
from peagle.masks import AmortizedMask, pard_mask, reference_mask

__all__ = ["TrainingError", "Example", "build_example", "truncate", "load_rows", "MaskBuilder"]


class TrainingError(ValueError):
    """Bad training input: mismatched hidden states, nothing to train on, unknown method."""


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


def load_rows(dataset: Any, index: int, ctx: int, copy: bool) -> dict[str, torch.Tensor]:
    """Training rows of sequence ``index`` (see ``shifted_rows``), truncated to ``ctx`` tokens.

    ``copy``: clone them out of the dataset's shard cache, so that the step's own data is a tensor
    the live-tensor accountant counts (on CUDA the example's copy to the device is counted instead).
    """
    from peagle.hidden import shifted_rows

    rows = shifted_rows(truncate(dataset[index], ctx))
    return {k: v.clone() for k, v in rows.items()} if copy else rows
