"""Super-sequence layouts and COD (conditional drop-token) sampling (DESIGN §3).

A training sequence of T tokens gives n = T-1 *rows* (row i = input token x_{i+1}, target
hidden g_i; see DESIGN §1). Rows are the anchors of the parallel-drafting chains: element
``(a, d)`` is the depth-``d`` mask slot that continues the chain anchored at row ``a``; its
RoPE position is ``a + d`` and its target is the row ``a + d`` target. An element exists only
if ``a + d <= n - 1`` and ``doc[a + d] == doc[a]`` (its target stays in the anchor's document).

A :class:`Layout` lists the elements of one super-sequence, grouped by depth: all depth-0 rows
in order ``0..n-1``, then the kept depth-1 elements sorted by anchor, then depth 2, ...
Padding (``valid == False``) may follow at the end.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Layout",
    "cod_sample",
    "full_grid",
    "depth_keep_count",
    "expected_elements",
    "validate_layout",
]


@dataclass(frozen=True)
class Layout:
    """Per-element description of a super-sequence; every tensor has shape [L].

    anchor: int64, the chain's anchor row. depth: int64, 0 = real token, >= 1 = mask slot.
    doc: int64 document id (-1 for padding). valid: bool, False for padding elements.
    ``valid`` may be omitted (None): every element is then valid.
    """

    anchor: torch.Tensor
    depth: torch.Tensor
    doc: torch.Tensor
    valid: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Normalise dtypes once here so every consumer can index with these tensors directly.
        for name in ("anchor", "depth", "doc"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                t = torch.as_tensor(t)
            if t.dim() != 1:
                raise ValueError(f"Layout.{name} must be 1-D [L], got shape {tuple(t.shape)}")
            object.__setattr__(self, name, t.to(torch.int64))
        valid = self.valid
        if valid is None:
            valid = torch.ones(self.anchor.shape, dtype=torch.bool, device=self.anchor.device)
        elif not isinstance(valid, torch.Tensor):
            valid = torch.as_tensor(valid)
        object.__setattr__(self, "valid", valid.to(torch.bool))
        n = self.anchor.shape[0]
        for name in ("depth", "doc", "valid"):
            if getattr(self, name).shape != (n,):
                raise ValueError(
                    f"Layout.{name} has shape {tuple(getattr(self, name).shape)}, expected ({n},)"
                )

    def __len__(self) -> int:
        return int(self.anchor.shape[0])

    @property
    def positions(self) -> torch.Tensor:
        """RoPE position of every element, ``anchor + depth``: int64 [L]."""
        return self.anchor + self.depth

    @property
    def num_depths(self) -> int:
        """1 + the largest depth among valid elements (0 for a layout with no valid element)."""
        d = self.depth[self.valid]
        return int(d.max().item()) + 1 if d.numel() else 0

    def depth_counts(self) -> list[int]:
        """Number of valid elements at each depth ``0..num_depths-1``."""
        d = self.depth[self.valid]
        if d.numel() == 0:
            return []
        return torch.bincount(d, minlength=self.num_depths).tolist()

    def pad_to(self, length: int) -> Layout:
        """Append padding elements (anchor 0, depth 0, doc -1, valid False) up to ``length``."""
        extra = length - len(self)
        if extra < 0:
            raise ValueError(f"cannot pad a layout of {len(self)} elements down to {length}")
        if extra == 0:
            return self
        dev = self.anchor.device
        zeros = torch.zeros(extra, dtype=torch.int64, device=dev)
        return Layout(
            anchor=torch.cat([self.anchor, zeros]),
            depth=torch.cat([self.depth, zeros]),
            doc=torch.cat([self.doc, torch.full((extra,), -1, dtype=torch.int64, device=dev)]),
            valid=torch.cat([self.valid, torch.zeros(extra, dtype=torch.bool, device=dev)]),
        )

    def to(self, device: torch.device | str) -> Layout:
        """The same layout with every tensor on ``device``."""
        return Layout(
            self.anchor.to(device), self.depth.to(device), self.doc.to(device), self.valid.to(device)
        )


def _is_int(x: object) -> bool:
    # Accept any integral type (Python, numpy, 0-d integer tensors) but not bools or floats.
    try:
        operator.index(x)  # type: ignore[arg-type]
    except TypeError:
        return False
    return not isinstance(x, bool)


def _check_args(n: int, k: int, retention: float, retention_min: float) -> None:
    if not _is_int(n) or n < 1:
        raise ValueError(f"n (number of rows = sequence length - 1) must be an int >= 1, got {n!r}")
    if not _is_int(k) or k < 1:
        raise ValueError(f"k (number of depths incl. depth 0) must be an int >= 1, got {k!r}")
    if not 0.0 < retention <= 1.0:
        raise ValueError(f"retention must satisfy 0 < retention <= 1, got {retention!r}")
    if not 0.0 <= retention_min <= 1.0:
        raise ValueError(f"retention_min must satisfy 0 <= retention_min <= 1, got {retention_min!r}")


def _row_docs(n: int, doc_ids: torch.Tensor | Sequence[int] | None) -> torch.Tensor:
    """Document id of each row: int64 [n] (all zeros when ``doc_ids`` is None)."""
    if doc_ids is None:
        return torch.zeros(n, dtype=torch.int64)
    docs = torch.as_tensor(doc_ids).to(device="cpu", dtype=torch.int64)
    if docs.shape != (n,):
        raise ValueError(f"doc_ids must have shape ({n},) (one id per row), got {tuple(docs.shape)}")
    return docs


def depth_keep_count(n: int, d: int, retention: float, retention_min: float = 0.0) -> int:
    """Configured number of depth-``d`` elements before clipping to the pool size.

    ``round(n * max(retention**d, retention_min))`` with Python's ``round`` (half to even);
    depth 0 always gives ``n``.
    """
    if d == 0:
        return n
    return int(round(n * max(retention**d, retention_min)))


def expected_elements(n: int, k: int, retention: float, retention_min: float = 0.0) -> float:
    """Approximate super-sequence length ``sum_d n * max(r^d, r_min)`` for d = 0..k-1.

    Ignores rounding and the shrinking pools near sequence/document ends, so it slightly
    over-estimates the real length (by at most about k^2/2 elements per document).
    With r_min = 0 it equals ``n * (1 - r^k) / (1 - r)``.
    """
    _check_args(n, k, retention, retention_min)
    return float(sum(n * max(retention**d, retention_min) for d in range(k)))


def cod_sample(
    n: int,
    k: int,
    retention: float,
    retention_min: float = 0.0,
    generator: torch.Generator | None = None,
    doc_ids: torch.Tensor | Sequence[int] | None = None,
) -> Layout:
    """COD-sample the elements of one super-sequence of ``n`` rows and ``k`` depths.

    Depth 0 keeps all n rows. Depth d = 1..k-1 keeps
    ``min(len(pool), depth_keep_count(n, d, retention, retention_min))`` chains drawn uniformly
    without replacement (``torch.randperm`` with ``generator``; None = torch's global RNG)
    from the pool of chains that survived depth d-1 and are still valid at depth d
    (``a + d <= n - 1`` and ``doc[a + d] == doc[a]``). Chains are therefore nested.

    doc_ids: int [n], document id per row (packed documents), or None for one document.
    Returns a :class:`Layout` of length L = sum of kept counts, all valid, CPU tensors.
    """
    _check_args(n, k, retention, retention_min)
    n, k = operator.index(n), operator.index(k)
    docs = _row_docs(n, doc_ids)
    survivors = torch.arange(n, dtype=torch.int64)  # anchors alive at the current depth
    anchors: list[torch.Tensor] = [survivors]
    depths: list[torch.Tensor] = [torch.zeros(n, dtype=torch.int64)]
    for d in range(1, k):
        # Pool: chains alive at depth d-1 whose depth-d target stays inside the sequence and
        # inside the anchor's document. Anchors are rows >= 0, so none can be negative.
        in_seq = survivors[survivors + d <= n - 1]
        pool = in_seq[docs[in_seq + d] == docs[in_seq]]
        keep = min(int(pool.numel()), depth_keep_count(n, d, retention, retention_min))
        if keep == 0:
            break  # deeper depths draw from an empty pool too
        if keep < pool.numel():
            pick = torch.randperm(int(pool.numel()), generator=generator)[:keep]
            survivors = torch.sort(pool[pick]).values
        else:
            survivors = pool  # already sorted: pools are filtered sorted tensors
        anchors.append(survivors)
        depths.append(torch.full((keep,), d, dtype=torch.int64))
    anchor = torch.cat(anchors)
    return Layout(anchor=anchor, depth=torch.cat(depths), doc=docs[anchor])


def full_grid(n: int, k: int, doc_ids: torch.Tensor | Sequence[int] | None = None) -> Layout:
    """Every valid element of the n x k grid (what ParallelSpec trains on): COD with r = 1."""
    return cod_sample(n, k, 1.0, doc_ids=doc_ids)


def validate_layout(
    layout: Layout, n: int, doc_ids: torch.Tensor | Sequence[int] | None = None
) -> None:
    """Raise ValueError unless ``layout`` obeys the conventions for a sequence of ``n`` rows.

    Checks (on valid elements): grouping by depth with anchors strictly increasing inside a
    group, all n depth-0 rows present, anchors in range, ``a + d <= n - 1``, document
    consistency (when ``doc_ids`` is given) and chain nesting; padding only at the end.
    """
    v = layout.valid
    if v.numel() and bool(v.any()):
        last_valid = int(torch.nonzero(v).max())
        if not bool(v[: last_valid + 1].all()):
            raise ValueError("padding elements must all come after the valid ones")
    a, d = layout.anchor[v].cpu(), layout.depth[v].cpu()
    if a.numel() and (int(a.min()) < 0 or int(d.min()) < 0):
        raise ValueError("negative anchor or depth")
    if a.numel() and int((a + d).max()) > n - 1:
        raise ValueError(f"an element lies past the last row (anchor + depth > {n - 1})")
    if not torch.equal(a[d == 0], torch.arange(n)):
        raise ValueError(f"depth-0 elements must be exactly rows 0..{n - 1} in order")
    if a.numel() > 1:
        if bool((d[1:] < d[:-1]).any()):
            raise ValueError("elements are not grouped by non-decreasing depth")
        same = d[1:] == d[:-1]
        if bool((a[1:][same] <= a[:-1][same]).any()):
            raise ValueError("anchors inside a depth group must be strictly increasing")
    present = set(zip(a.tolist(), d.tolist()))
    for aa, dd in present:
        if dd > 0 and (aa, dd - 1) not in present:
            raise ValueError(f"element ({aa}, {dd}) has no parent ({aa}, {dd - 1})")
    if doc_ids is not None:
        docs = _row_docs(n, doc_ids)
        if not torch.equal(docs[a], layout.doc[v].cpu()):
            raise ValueError("layout.doc differs from the anchor rows' document ids")
        if not torch.equal(docs[a + d], docs[a]):
            raise ValueError("an element's target crosses a document boundary")
