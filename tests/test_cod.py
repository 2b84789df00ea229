"""COD sampling and Layout (DESIGN §3)."""

from __future__ import annotations

import pytest
import torch

from peagle.cod import (
    Layout,
    cod_sample,
    depth_keep_count,
    expected_elements,
    full_grid,
    validate_layout,
)


def _docs(n: int, gen: torch.Generator, max_docs: int = 4) -> torch.Tensor:
    """Random contiguous document ids for n rows (packed documents)."""
    ndocs = int(torch.randint(1, max_docs + 1, (1,), generator=gen))
    cuts = torch.sort(torch.randperm(max(n - 1, 1), generator=gen)[: ndocs - 1] + 1).values
    docs = torch.zeros(n, dtype=torch.int64)
    for c in cuts.tolist():
        docs[c:] += 1
    return docs


def _cases(num: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num):
        n = int(torch.randint(1, 60, (1,), generator=gen))
        k = int(torch.randint(1, 8, (1,), generator=gen))
        r = float(torch.empty(1).uniform_(0.2, 1.0, generator=gen))
        r_min = float(torch.empty(1).uniform_(0.0, 0.4, generator=gen)) if n % 2 else 0.0
        docs = _docs(n, gen) if n % 3 else None
        yield n, k, r, r_min, docs, gen


def test_structure_on_random_cases() -> None:
    for n, k, r, r_min, docs, gen in _cases(300):
        lay = cod_sample(n, k, r, r_min, generator=gen, doc_ids=docs)
        row_doc = torch.zeros(n, dtype=torch.int64) if docs is None else docs
        # The module's own validator plus explicit checks of the same properties.
        validate_layout(lay, n, row_doc)
        a, d = lay.anchor, lay.depth
        assert lay.anchor.dtype == lay.depth.dtype == lay.doc.dtype == torch.int64
        assert bool(lay.valid.all())
        assert int(a.min()) >= 0
        assert int((a + d).max()) <= n - 1
        assert torch.equal(row_doc[a + d], row_doc[a])  # no chain crosses a document
        assert torch.equal(lay.doc, row_doc[a])
        assert torch.equal(lay.positions, a + d)
        present = set(zip(a.tolist(), d.tolist()))
        assert len(present) == len(lay)  # no duplicates
        for aa, dd in present:
            if dd:
                assert (aa, dd - 1) in present  # nested chains
        # Grouped by depth, anchors sorted inside a group, depth 0 = rows 0..n-1.
        assert bool((d[1:] >= d[:-1]).all())
        assert torch.equal(a[d == 0], torch.arange(n))
        for dd in range(1, k):
            g = a[d == dd]
            assert bool((g[1:] > g[:-1]).all())
        # Counts per depth follow the configured formula, clipped to the pool size.
        assert int(d.max()) < k
        counts = lay.depth_counts()
        assert counts[0] == n
        prev = set(range(n))
        for dd in range(1, k):
            pool = {x for x in prev if x + dd <= n - 1 and row_doc[x + dd] == row_doc[x]}
            expect = min(len(pool), depth_keep_count(n, dd, r, r_min))
            got = counts[dd] if dd < len(counts) else 0
            assert got == expect, (n, k, r, r_min, dd)
            prev = set(a[d == dd].tolist())
            assert prev <= pool


def test_keep_count_formula() -> None:
    assert depth_keep_count(100, 0, 0.5) == 100
    assert depth_keep_count(100, 1, 0.8) == 80
    assert depth_keep_count(100, 3, 0.8) == round(100 * 0.8**3)
    assert depth_keep_count(100, 7, 0.7, 0.2) == 20  # floor kicks in: 0.7^7 < 0.2
    lay = cod_sample(1000, 8, 0.8, generator=torch.Generator().manual_seed(1))
    assert lay.depth_counts() == [1000] + [round(1000 * 0.8**d) for d in range(1, 8)]


def test_determinism() -> None:
    def draw(seed: int) -> Layout:
        return cod_sample(200, 6, 0.7, 0.1, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(5), draw(5), draw(6)
    assert torch.equal(a.anchor, b.anchor) and torch.equal(a.depth, b.depth)
    assert not torch.equal(a.anchor, c.anchor)


def test_full_grid_is_retention_one() -> None:
    docs = torch.tensor([0] * 7 + [1] * 5 + [2] * 1)
    g = full_grid(13, 4, doc_ids=docs)
    c = cod_sample(13, 4, 1.0, generator=torch.Generator().manual_seed(0), doc_ids=docs)
    assert torch.equal(g.anchor, c.anchor) and torch.equal(g.depth, c.depth)
    assert torch.equal(g.doc, c.doc)
    # Every in-document (a, d) is present: doc of length m contributes max(m - d, 0) at depth d.
    assert g.depth_counts() == [13, 6 + 4, 5 + 3, 4 + 2]
    single = full_grid(5, 3)
    assert single.anchor.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    assert single.depth.tolist() == [0] * 5 + [1] * 4 + [2] * 3


def test_expected_elements() -> None:
    n, k, r = 8192, 8, 0.8
    exp = expected_elements(n, k, r)
    assert exp == pytest.approx(n * (1 - r**k) / (1 - r))
    assert exp == pytest.approx(34_000, rel=0.02)  # DESIGN §3: 8192 tokens, K=8 -> ~34K
    lay = cod_sample(n, k, r, generator=torch.Generator().manual_seed(0))
    assert len(lay) == pytest.approx(exp, rel=0.01)
    with_floor = cod_sample(2048, 8, 0.7, 0.2, generator=torch.Generator().manual_seed(0))
    assert len(with_floor) == pytest.approx(expected_elements(2048, 8, 0.7, 0.2), rel=0.01)


def test_edge_sizes() -> None:
    one = cod_sample(1, 5, 0.8, generator=torch.Generator().manual_seed(0))
    assert one.anchor.tolist() == [0] and one.depth.tolist() == [0]
    k1 = cod_sample(10, 1, 0.5)
    assert k1.depth_counts() == [10] and k1.num_depths == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n=0, k=2, retention=0.8),
        dict(n=5, k=0, retention=0.8),
        dict(n=5, k=2, retention=0.0),
        dict(n=5, k=2, retention=1.5),
        dict(n=5, k=2, retention=0.8, retention_min=-0.1),
        dict(n=5, k=2, retention=0.8, retention_min=1.1),
        dict(n=5, k=2, retention=0.8, doc_ids=[0, 0, 1]),
    ],
)
def test_argument_errors(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        cod_sample(**kwargs)


def test_layout_helpers() -> None:
    lay = cod_sample(20, 4, 0.6, generator=torch.Generator().manual_seed(3))
    padded = lay.pad_to(len(lay) + 5)
    assert len(padded) == len(lay) + 5
    tail = slice(len(lay), None)
    assert padded.anchor[tail].tolist() == [0] * 5 and padded.depth[tail].tolist() == [0] * 5
    assert padded.doc[tail].tolist() == [-1] * 5 and not bool(padded.valid[tail].any())
    assert padded.depth_counts() == lay.depth_counts()  # padding is not counted
    assert padded.num_depths == lay.num_depths == 4
    assert lay.pad_to(len(lay)) is lay
    with pytest.raises(ValueError):
        lay.pad_to(len(lay) - 1)
    with pytest.raises(ValueError):
        Layout(torch.zeros(3), torch.zeros(2), torch.zeros(3))
    # valid defaults to all True and tensors are normalised to int64.
    raw = Layout(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 0]), torch.tensor([0, 0]))
    assert raw.anchor.dtype == torch.int64 and raw.valid.tolist() == [True, True]
    validate_layout(padded, 20)
    with pytest.raises(ValueError):
        validate_layout(Layout(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), torch.zeros(3)), 2)
