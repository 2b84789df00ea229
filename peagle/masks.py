"""Cross-depth attention masks for COD super-sequences (DESIGN §3).

Rule: query ``(a_q, d_q)`` may attend key ``(a_k, d_k)`` iff both are valid, in the same
document, and ``(d_k == 0 and a_k <= a_q) or (a_k == a_q and d_k <= d_q)`` -- real context up
to the chain's anchor plus the earlier-or-equal depths of its own chain. For depth 0 this is
plain causal attention. Masks are bool [L, L], True = may attend (rows = queries, cols = keys).

Three realisations, all equal to :func:`reference_mask` (the test oracle):

* :func:`pard_mask` -- PARD-style: a dense (position, depth) grid mask built from scratch per
  example, then indexed (the O((nk)^2)-per-example baseline of the paper's Table 2).
* :class:`AmortizedMask` -- the paper's §3.1: the grid mask is built once for a maximum length
  (stored factored: a dense depth-0 block plus sparse chain rows) and each example's mask is
  obtained by indexing only.
* the mask-free FlexAttention ``mask_mod`` lives elsewhere (it needs no dense mask at all).
"""

from __future__ import annotations

import logging

import torch

from peagle.cod import Layout

__all__ = [
    "MaskCapacityError",
    "reference_mask",
    "pard_mask",
    "AmortizedMask",
    "attention_bias",
]

log = logging.getLogger(__name__)


# Storage reference counts, to recycle an output buffer only once nobody else holds it. Private
# torch API: where it is missing, masks are simply always freshly allocated.
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _storage_refs(t: torch.Tensor) -> int:
    storage = t.untyped_storage()  # held while counting: the count must not see a dangling pointer
    return int(_STORAGE_USE_COUNT(storage._cdata))  # type: ignore[misc]


_SOLE_OWNER_REFS = _storage_refs(torch.empty(8)) if _STORAGE_USE_COUNT is not None else 0


def _sole_owner(t: torch.Tensor) -> bool:
    """True if no tensor other than ``t`` (no view, no autograd save) shares its storage."""
    if _STORAGE_USE_COUNT is None:
        return False
    return _storage_refs(t) <= _SOLE_OWNER_REFS


class MaskCapacityError(ValueError):
    """A layout does not fit the precomputed :class:`AmortizedMask` grid."""


def reference_mask(layout: Layout) -> torch.Tensor:
    """Brute-force mask, one Python test per (query, key) pair: bool [L, L] on CPU.

    Deliberately literal (it is the oracle the fast versions are tested against).
    """
    anchor = layout.anchor.tolist()
    depth = layout.depth.tolist()
    doc = layout.doc.tolist()
    valid = layout.valid.tolist()
    L = len(anchor)
    rows = []
    for q in range(L):
        row = []
        for k in range(L):
            allowed = (
                valid[q]
                and valid[k]
                and doc[q] == doc[k]
                and (
                    (depth[k] == 0 and anchor[k] <= anchor[q])
                    or (anchor[k] == anchor[q] and depth[k] <= depth[q])
                )
            )
            row.append(allowed)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(L, L)


def _grid_mask(
    n: int, k: int, cell_doc: torch.Tensor | None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Dense rule over the full n x k grid: bool [n*k, n*k], grid index = depth * n + anchor.

    cell_doc: int64 [n*k] document id per grid cell, or None for a single document.
    Works in place on one [G, G] buffer plus one temporary so peak memory stays ~2 G^2 bytes.
    """
    g = torch.arange(n * k, dtype=torch.int64, device=device)
    a, d = g % n, g // n
    # Context part: key is a real token (depth 0) at or before the query's anchor.
    m = a[None, :] <= a[:, None]
    m &= (d == 0)[None, :]
    # Chain part: same anchor, key depth not deeper than the query's.
    chain = a[None, :] == a[:, None]
    chain &= d[None, :] <= d[:, None]
    m |= chain
    del chain
    if cell_doc is not None:
        m &= cell_doc[None, :] == cell_doc[:, None]
    return m


def _check_range(layout: Layout, n: int, k: int) -> None:
    v = layout.valid
    if not bool(v.any()):
        return
    a, d = layout.anchor[v], layout.depth[v]
    if int(a.min()) < 0 or int(d.min()) < 0:
        raise ValueError("layout has a negative anchor or depth")
    if int(a.max()) >= n or int(d.max()) >= k:
        raise ValueError(
            f"layout has anchor up to {int(a.max())} and depth up to {int(d.max())}, "
            f"outside the n={n} x k={k} grid"
        )


def pard_mask(layout: Layout, n: int, k: int) -> torch.Tensor:
    """PARD-style mask: bool [L, L], built from scratch for this example.

    Builds the dense [n*k, n*k] mask of this example's whole (anchor, depth) grid, with a
    document id per grid cell (the anchor row's document), then keeps the rows/columns of the
    sampled elements. O((nk)^2) time and memory per call, nothing cached between calls: this is
    the per-example construction whose cost the paper's Table 2 measures.
    """
    _check_range(layout, n, k)
    dev = layout.anchor.device
    v = layout.valid
    # Document of every row of this example, scattered from the elements' anchors.
    row_doc = torch.full((n,), -1, dtype=torch.int64, device=dev)
    row_doc[layout.anchor[v]] = layout.doc[v]
    cell_doc = row_doc.repeat(k)  # grid cell depth*n + a belongs to row a's document
    grid = _grid_mask(n, k, cell_doc, device=dev)
    # Padding elements point at cell 0; the valid AND below removes them.
    idx = torch.where(v, layout.depth * n + layout.anchor, 0)
    mask = grid[idx][:, idx]
    mask &= v[:, None] & v[None, :]
    return mask


class AmortizedMask:
    """Grid mask precomputed once for one document of ``max_len`` rows and ``k`` depths (§3.1).

    ``get(layout)`` returns the example's bool [L, L] mask by indexing precomputed tensors only;
    the rule is never evaluated per example. Because the rule depends only on anchor
    differences and equalities (position invariance), one grid serves every example: the
    layout's anchors are rebased to its smallest valid anchor, so its span
    ``max(anchor + depth) - min(anchor) + 1`` must be <= max_len and its depths < k.

    The (max_len*k)^2 grid (grid index = depth * max_len + anchor) is stored factored, because
    its blocks are highly redundant:

    * ``context`` bool [M, M]: the keys at depth 0. Grid row ``d*M + a`` restricted to the
      depth-0 columns is the same for every query depth d, so one block serves all depths.
    * ``chain_cols`` int64 [k*M, k-1]: the grid's other nonzeros, row by row (at most k-1 per
      row: the earlier-or-equal depths of the query's own chain), as grid column indices with
      -1 for none -- the grid's off-context part in sparse-row form.

    Retrieval for a *canonical* layout (what :func:`peagle.cod.cod_sample` makes: valid
    elements first, depth-0 elements first with consecutive anchors, then unique
    (anchor, depth) pairs grouped by depth) is: a contiguous slice of ``context`` for the
    depth-0 queries, a row gather of it for the deeper ones, and a gather of ``chain_cols``
    mapped to element indices through the layout's grid-cell -> element map. That writes only
    the L x n context block and at most k-1 chain entries per row into a zeroed [L, L] mask,
    instead of gathering L full grid rows and then L^2 columns. Any other layout falls back to
    gathering the dense grid, which is then materialised once (``grid``).

    Multiple packed documents add one [L, n] AND on the context block (chains never cross
    documents in a canonical layout; a layout whose chain elements disagree with their anchor
    row's document takes the dense path). Padding rows and columns are left empty.

    Memory: ``context`` holds max_len^2 bools (4.2 MB for 2048, 67 MB for 8192) and
    ``chain_cols`` 8*k*(k-1)*max_len bytes; the dense fallback grid (max_len*k)^2 bytes
    (268 MB for 2048 x 8) plus a transient buffer of the same size while it is built. The last
    returned mask's buffer is kept and reused once its holder has dropped it (see
    ``_output_buffer``), so a training loop allocates one [L, L] mask, not one per example.

    Layouts that do not fit raise :class:`MaskCapacityError` unless ``grow=True``, in which
    case the tables are rebuilt to exactly the needed size (logged; counted in ``regrowths``).
    """

    def __init__(
        self,
        max_len: int,
        k: int,
        grow: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if max_len < 1 or k < 1:
            raise ValueError(f"AmortizedMask needs max_len >= 1 and k >= 1, got {max_len}, {k}")
        self.grow = grow
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.regrowths = 0
        self._build(max_len, k)

    def _build(self, max_len: int, k: int) -> None:
        self.max_len = max_len
        self.k = k
        self._grid: torch.Tensor | None = None  # dense fallback, built on first use
        self._recycle: torch.Tensor | None = None  # flat bool buffer of the last returned mask
        # Both tables come from the one rule implementation (_grid_mask), never re-derived.
        # Depth-0 block of the grid (single anchor depth): context keys of any query row.
        self.context = _grid_mask(max_len, 1, None, device=self.device)
        # For one anchor, which key depths >= 1 each query depth sees ([k, k-1]); by position
        # invariance the grid's (d_q, d_k) block for d_k >= 1 is that bit times the identity.
        sees = _grid_mask(1, k, None, device=self.device)[:, 1:]
        cell = torch.arange(k * max_len, dtype=torch.int64, device=self.device)
        key_depth = torch.arange(1, k, dtype=torch.int64, device=self.device)
        cols = key_depth[None, :] * max_len + (cell % max_len)[:, None]  # same anchor, depth d_k
        self.chain_cols = torch.where(sees[cell // max_len], cols, -1)

    @property
    def grid(self) -> torch.Tensor:
        """The dense grid mask, bool [k*max_len, k*max_len] (built on first access)."""
        if self._grid is None:
            # A single document, so no per-cell doc ids: documents are handled in get().
            self._grid = _grid_mask(self.max_len, self.k, None, device=self.device)
        return self._grid

    def get(self, layout: Layout, out: torch.Tensor | None = None) -> torch.Tensor:
        """The layout's mask, bool [L, L] on this object's device (equal to reference_mask).

        out: optional bool buffer on this device with at least L*L elements, reused for the
        result (a view of it is returned; its previous contents are overwritten). On CPU most of
        the cost of a fresh [L, L] tensor is first-touch page faults, so a collator that reuses
        one buffer per worker retrieves masks several times faster. The caller must not reuse
        the buffer while a mask written into it is still needed (e.g. by an autograd graph).
        """
        v = layout.valid.to(self.device)
        anchor = layout.anchor.to(self.device)
        depth = layout.depth.to(self.device)
        L = anchor.shape[0]
        if not bool(v.any()):
            return torch.zeros(L, L, dtype=torch.bool, device=self.device)
        a_valid = anchor[v]
        base = int(a_valid.min())
        span = int((a_valid + depth[v]).max()) - base + 1
        max_depth = int(depth[v].max())
        if int(depth[v].min()) < 0:
            raise ValueError("layout has a negative depth")
        if span > self.max_len or max_depth >= self.k:
            self._handle_overflow(span, max_depth + 1)
        doc = layout.doc.to(self.device)
        n0 = self._canonical_depth0(v, anchor, depth, doc, base)
        if n0 is not None:
            if out is None:
                out = self._output_buffer(L * L)
            elif out.dtype != torch.bool or out.device != self.device or out.numel() < L * L:
                raise ValueError(f"out must be a bool tensor on {self.device} with >= {L * L} elements, got "
                                 f"{out.dtype} on {out.device} with {out.numel()}")
            buf = out.view(-1)[: L * L].view(L, L)
            return self._get_canonical(anchor, depth, doc, base, int(v.sum()), n0, buf)
        mask = self._get_dense(v, anchor, depth, doc, base)
        if out is not None:  # same contract on the dense path (a copy; that path is the slow one)
            buf = out.view(-1)[: L * L].view(L, L)
            buf.copy_(mask)
            return buf
        return mask

    def _output_buffer(self, numel: int) -> torch.Tensor:
        """Flat bool buffer of >= numel elements for the next mask (a caching allocator of one).

        The previous mask's buffer is reused once nothing references it any more (the training
        loop drops each mask before the next example): on CPU, first-touch page faults of a
        fresh [L, L] tensor cost several times the retrieval itself. While the previous mask is
        still held (by the caller or an autograd graph) a fresh buffer is allocated instead, so
        a returned mask is never overwritten behind its holder's back.
        """
        buf = self._recycle
        if buf is not None and buf.numel() >= numel and _sole_owner(buf):
            return buf
        # Headroom: L varies by a few percent between examples of one length.
        buf = torch.empty(int(numel * 1.06) + 1, dtype=torch.bool, device=self.device)
        self._recycle = buf
        return buf

    def _canonical_depth0(self, v: torch.Tensor, anchor: torch.Tensor, depth: torch.Tensor,
                          doc: torch.Tensor, base: int) -> int | None:
        """Number n0 of depth-0 elements if the layout is canonical (see class doc), else None.

        O(L) checks; every one guards an assumption of :meth:`_get_canonical`.
        """
        lv = int(v.sum())
        if not bool(v[:lv].all()):
            return None  # padding before a valid element
        a, d = anchor[:lv], depth[:lv]
        n0 = int((d == 0).sum())
        if n0 == 0 or bool(d[:n0].any()):
            return None  # depth-0 elements must come first
        if not torch.equal(a[:n0], torch.arange(base, base + n0, device=a.device)):
            return None  # context keys must be the contiguous columns 0..n0-1
        if lv > n0:
            step = d[n0 + 1:] - d[n0:-1]
            # Non-decreasing depth and strictly increasing anchors within a depth: every
            # (anchor, depth) cell is used at most once, so the cell -> element map is exact.
            if bool((step < 0).any()) or bool(((step == 0) & (a[n0 + 1:] <= a[n0:-1])).any()):
                return None
            if bool(((a[n0:] - base) >= n0).any()):
                return None  # a chain without its depth-0 anchor element
            dv = doc[:lv]
            if bool((dv[n0:] != dv[a[n0:] - base]).any()):
                return None  # a chain element in another document than its anchor row
        return n0

    def _get_canonical(self, anchor: torch.Tensor, depth: torch.Tensor, doc: torch.Tensor,
                       base: int, lv: int, n0: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Mask of a canonical layout with lv valid elements, the first n0 at depth 0."""
        L = anchor.shape[0]
        dev = self.device
        # Every byte is written exactly once (no zero-fill followed by overwrites): on CPU the
        # cost of a fresh [L, L] tensor is dominated by first-touch page faults and memory
        # bandwidth, so double writes would cost as much as the retrieval itself.
        mask = torch.empty(L, L, dtype=torch.bool, device=dev) if out is None else out
        ctx = self.context[:n0, :n0]  # rebased depth-0 anchors are 0..n0-1
        mask[:n0, :n0] = ctx  # depth-0 queries: one contiguous block, no gather
        mask[:n0, n0:] = False  # real tokens never see mask slots (or padding)
        if lv > n0:
            local = anchor[n0:lv] - base  # [Ld] anchors of the deeper queries, all < n0
            # Row gather (each row a contiguous run of n0 bytes) straight into the mask rows,
            # without a temporary [Ld, n0] tensor.
            if dev.type == "cpu":
                torch.index_select(ctx, 0, local, out=mask[n0:lv, :n0])
            else:
                mask[n0:lv, :n0] = ctx.index_select(0, local)
            mask[n0:lv, n0:] = False
            # Chain keys: the precomputed sparse grid rows of these queries, in grid columns,
            # mapped to element indices through this layout's cell -> element map.
            cell = depth[:lv] * self.max_len + (anchor[:lv] - base)  # [lv]
            elem_of_cell = torch.full((self.k * self.max_len,), -1, dtype=torch.int64, device=dev)
            elem_of_cell[cell] = torch.arange(lv, dtype=torch.int64, device=dev)
            cols = self.chain_cols.index_select(0, cell[n0:])  # [Ld, k-1] grid columns or -1
            keys = torch.where(cols >= 0, elem_of_cell[cols.clamp(min=0)], -1)
            rows = torch.arange(n0, lv, dtype=torch.int64, device=dev)[:, None].expand_as(keys)
            hit = keys >= 0  # a missing parent (non-nested chain) has no element to attend
            mask.view(-1)[rows[hit] * L + keys[hit]] = True
        mask[lv:] = False  # padding queries attend nothing (padding keys: zeroed above)
        dv = doc[:lv]
        if bool((dv != dv[0]).any()):
            # Packed documents: context keys only from the query's own document (chains are
            # document-consistent, checked in _canonical_depth0).
            mask[:lv, :n0] &= dv[:, None] == dv[None, :n0]
        return mask

    def _get_dense(self, v: torch.Tensor, anchor: torch.Tensor, depth: torch.Tensor,
                   doc: torch.Tensor, base: int) -> torch.Tensor:
        """General layouts: gather rows and columns of the dense grid (any order, padding)."""
        L = anchor.shape[0]
        # Padding elements may carry any anchor (anchor 0 < base after rebasing): send them
        # to cell 0; the key pass below clears their rows and columns.
        local = torch.where(v, anchor - base, 0)
        idx = torch.where(v, depth, 0) * self.max_len + local
        mask = self.grid[idx][:, idx]
        doc_valid = doc[v]
        multi_doc = bool((doc_valid != doc_valid[0]).any())
        has_pad = not bool(v.all())
        if multi_doc or has_pad:
            # One fused [L, L] pass for documents and padding: valid elements get key
            # doc - min_doc >= 0, padding a unique negative key, so padding matches only itself
            # (its diagonal is cleared next) and the single-document case skips the pass.
            key = (doc - doc_valid.min()) if multi_doc else torch.zeros_like(doc)
            key = torch.where(v, key, -1 - torch.arange(L, device=self.device))
            mask &= key[:, None] == key[None, :]
            if has_pad:
                mask.diagonal()[~v] = False
        return mask

    def _handle_overflow(self, span: int, depths: int) -> None:
        if not self.grow:
            raise MaskCapacityError(
                f"layout needs a mask of {span} positions x {depths} depths, but this "
                f"AmortizedMask was built for max_len={self.max_len}, k={self.k}. Raise the "
                f"config key `train.max_mask_len` to at least {span} (and train.k_train to at least "
                f"{depths} if the depth is the problem), or construct AmortizedMask with "
                f"grow=True to regrow it on demand."
            )
        new_len, new_k = max(span, self.max_len), max(depths, self.k)
        self.regrowths += 1
        log.warning(
            "AmortizedMask regrowing %dx%d -> %dx%d (regrowth #%d, context block %.1f MB)",
            self.max_len, self.k, new_len, new_k, self.regrowths, new_len**2 / 1e6,
        )
        # Free the old tables before allocating the new ones.
        self._grid = self._recycle = None
        self.context = self.chain_cols = None  # type: ignore[assignment]
        self._build(new_len, new_k)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention bias from a bool mask [..., L, L]: 0 where allowed, -inf elsewhere.

    Rows with no allowed key (padding queries) would make softmax return NaN, which poisons
    gradients even when the loss ignores those rows; such rows are given their own diagonal
    entry instead. Their outputs are meaningless and must be excluded from the loss.
    """
    L = mask.shape[-1]
    if mask.shape[-2] != L:
        raise ValueError(f"attention_bias needs a square mask [..., L, L], got {tuple(mask.shape)}")
    empty = ~mask.any(dim=-1)  # [..., L]
    if bool(empty.any()):
        eye = torch.eye(L, dtype=torch.bool, device=mask.device)
        mask = mask | (empty[..., :, None] & eye)
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, float("-inf"))
