"""Cross-depth masks: PARD-style and amortized construction against the brute-force rule."""

from __future__ import annotations

import logging

import pytest
import torch

from peagle.cod import Layout, cod_sample, full_grid
from peagle.masks import (
    AmortizedMask,
    MaskCapacityError,
    attention_bias,
    pard_mask,
    reference_mask,
)

MAX_N, MAX_K = 40, 6


def _docs(n: int, gen: torch.Generator) -> torch.Tensor | None:
    """None (one document) or random contiguous document ids for n rows."""
    ndocs = int(torch.randint(0, 4, (1,), generator=gen))
    if ndocs <= 1:
        return None
    cuts = torch.randint(1, max(n, 2), (ndocs - 1,), generator=gen).tolist()
    docs = torch.zeros(n, dtype=torch.int64)
    for c in cuts:
        docs[c:] += 1
    return docs


def _random_layout(gen: torch.Generator) -> tuple[Layout, int, int]:
    n = int(torch.randint(1, MAX_N + 1, (1,), generator=gen))
    k = int(torch.randint(1, MAX_K + 1, (1,), generator=gen))
    r = float(torch.empty(1).uniform_(0.3, 1.0, generator=gen))
    lay = cod_sample(n, k, r, 0.1, generator=gen, doc_ids=_docs(n, gen))
    pad = int(torch.randint(0, 4, (1,), generator=gen))
    return lay.pad_to(len(lay) + pad), n, k


def test_reference_on_hand_example() -> None:
    # Full grid, n=3, k=2: elements (0,0) (1,0) (2,0) (0,1) (1,1).
    m = reference_mask(full_grid(3, 2)).int().tolist()
    assert m == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],  # (0,1): context up to anchor 0, itself
        [1, 1, 0, 0, 1],  # (1,1): context up to anchor 1, itself
    ]


def test_random_cases_match_reference() -> None:
    gen = torch.Generator().manual_seed(1234)
    amort = AmortizedMask(MAX_N, MAX_K)
    for _ in range(300):
        lay, n, k = _random_layout(gen)
        ref = reference_mask(lay)
        assert torch.equal(pard_mask(lay, n, k), ref)
        assert torch.equal(amort.get(lay), ref)
    assert amort.regrowths == 0


@pytest.mark.parametrize("n,k", [(1, 1), (1, 4), (6, 6), (25, 4), (40, 6)])
def test_every_depth_present(n: int, k: int) -> None:
    docs = torch.tensor([0] * (n // 2) + [1] * (n - n // 2))
    for lay in (full_grid(n, k), full_grid(n, k, docs).pad_to(n * k + 3)):
        if n >= 2 * k:
            assert lay.num_depths == k
        ref = reference_mask(lay)
        assert torch.equal(pard_mask(lay, n, k), ref)
        assert torch.equal(AmortizedMask(n, k).get(lay), ref)


def test_depth0_block_is_causal_within_documents() -> None:
    n = 30
    docs = torch.tensor([0] * 12 + [1] * 10 + [2] * 8)
    lay = cod_sample(n, 5, 0.8, generator=torch.Generator().manual_seed(0), doc_ids=docs)
    same_doc = docs[:, None] == docs[None, :]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for m in (pard_mask(lay, n, 5), AmortizedMask(n, 5).get(lay), reference_mask(lay)):
        assert torch.equal(m[:n, :n], causal & same_doc)  # depth-0 elements come first
        assert not bool(m[:n, n:].any())  # real tokens never see mask slots


def test_padding_rows_and_columns_are_empty() -> None:
    lay = cod_sample(10, 3, 0.7, generator=torch.Generator().manual_seed(0)).pad_to(40)
    L = len(lay)
    pad = ~lay.valid
    for m in (pard_mask(lay, 10, 3), AmortizedMask(10, 3).get(lay)):
        assert m.shape == (L, L)
        assert not bool(m[pad].any()) and not bool(m[:, pad].any())


def test_position_invariance() -> None:
    gen = torch.Generator().manual_seed(7)
    amort = AmortizedMask(20, 5)
    for _ in range(20):
        n = int(torch.randint(2, 21, (1,), generator=gen))
        lay = cod_sample(n, 5, 0.75, generator=gen, doc_ids=_docs(n, gen))
        for offset in (1, 13):
            shifted = Layout(lay.anchor + offset, lay.depth, lay.doc, lay.valid)
            base = reference_mask(lay)
            assert torch.equal(reference_mask(shifted), base)
            assert torch.equal(pard_mask(shifted, n + offset, 5), base)
            # The amortized grid rebases anchors, so a shifted layout still fits max_len=20.
            assert torch.equal(amort.get(shifted), base)
    assert amort.regrowths == 0


def test_capacity_error_and_regrowth(caplog: pytest.LogCaptureFixture) -> None:
    lay = cod_sample(30, 4, 0.8, generator=torch.Generator().manual_seed(0))
    small = AmortizedMask(16, 4)
    with pytest.raises(MaskCapacityError) as err:
        small.get(lay)
    msg = str(err.value)
    assert "30" in msg and "max_len=16" in msg and "train.max_mask_len" in msg and "grow=True" in msg
    assert isinstance(err.value, ValueError)
    with pytest.raises(MaskCapacityError, match="k=2"):
        AmortizedMask(30, 2).get(lay)

    growing = AmortizedMask(16, 2, grow=True)
    with caplog.at_level(logging.WARNING, logger="peagle.masks"):
        got = growing.get(lay)
    assert torch.equal(got, reference_mask(lay))
    assert growing.regrowths == 1 and growing.max_len == 30 and growing.k == 4
    assert any("regrow" in r.getMessage() for r in caplog.records)
    growing.get(lay)  # fits now: no further regrowth
    assert growing.regrowths == 1


def test_pard_mask_rejects_out_of_grid() -> None:
    lay = full_grid(10, 3)
    with pytest.raises(ValueError):
        pard_mask(lay, 8, 3)
    with pytest.raises(ValueError):
        pard_mask(lay, 10, 2)


def test_attention_bias() -> None:
    lay = cod_sample(12, 3, 0.8, generator=torch.Generator().manual_seed(0)).pad_to(30)
    mask = AmortizedMask(12, 3).get(lay)
    bias = attention_bias(mask, torch.float32)
    assert bias.dtype == torch.float32 and bias.shape == mask.shape
    valid = lay.valid
    assert torch.equal(bias[valid] == 0, mask[valid])
    assert bool(torch.isneginf(bias[valid][~mask[valid]]).all())
    pad_rows = bias[~valid]
    assert torch.equal(pad_rows == 0, torch.eye(len(lay), dtype=torch.bool)[~valid])
    probs = torch.softmax(torch.randn(len(lay), len(lay)) + bias, dim=-1)
    assert not bool(torch.isnan(probs).any())
    batched = attention_bias(torch.stack([mask, mask]), torch.bfloat16)
    assert batched.dtype == torch.bfloat16 and batched.shape == (2, *mask.shape)


# --------------------------------------------------------------------------- retrieval paths


def test_factored_tables_reproduce_the_dense_grid() -> None:
    """context + chain_cols are exactly the dense (max_len*k)^2 grid, stored factored."""
    for m_len, k in [(1, 1), (5, 1), (1, 4), (7, 3), (12, 5)]:
        am = AmortizedMask(m_len, k)
        dense = torch.zeros(k * m_len, k * m_len, dtype=torch.bool)
        dense[:, :m_len] = am.context.repeat(k, 1)  # depth-0 keys: same block for every depth
        rows, slot = torch.nonzero(am.chain_cols >= 0, as_tuple=True)
        dense[rows, am.chain_cols[rows, slot]] = True
        assert torch.equal(dense, am.grid)


def _permuted(lay: Layout, gen: torch.Generator) -> Layout:
    p = torch.randperm(len(lay), generator=gen)
    return Layout(lay.anchor[p], lay.depth[p], lay.doc[p], lay.valid[p])


def test_canonical_layouts_never_build_the_dense_grid() -> None:
    gen = torch.Generator().manual_seed(5)
    amort = AmortizedMask(MAX_N, MAX_K)
    for _ in range(50):
        lay, _, _ = _random_layout(gen)
        assert torch.equal(amort.get(lay), reference_mask(lay))
    assert amort._grid is None


def test_non_canonical_layouts_take_the_dense_path() -> None:
    """Shuffled elements, padding in the middle, doc-inconsistent or non-nested chains."""
    gen = torch.Generator().manual_seed(11)
    for _ in range(60):
        lay, _, _ = _random_layout(gen)
        amort = AmortizedMask(MAX_N, MAX_K)
        shuffled = _permuted(lay, gen)
        assert torch.equal(amort.get(shuffled), reference_mask(shuffled))
    # A chain element labelled with another document than its anchor row.
    lay = full_grid(8, 3)
    doc = lay.doc.clone()
    doc[-1] = 5
    odd = Layout(lay.anchor, lay.depth, doc)
    amort = AmortizedMask(8, 3)
    assert torch.equal(amort.get(odd), reference_mask(odd))
    assert amort._grid is not None
    # Non-nested chain: (2, 2) without its parent (2, 1) stays on the fast path.
    nn_lay = Layout(torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.tensor([0, 0, 0, 0, 1, 1, 2]),
                    torch.zeros(7, dtype=torch.int64))
    amort = AmortizedMask(8, 3)
    assert torch.equal(amort.get(nn_lay), reference_mask(nn_lay))
    assert amort._grid is None


def test_duplicate_cells_match_reference() -> None:
    lay = Layout(torch.tensor([0, 1, 2, 1, 1]), torch.tensor([0, 0, 0, 1, 1]), torch.zeros(5, dtype=torch.int64))
    assert torch.equal(AmortizedMask(4, 3).get(lay), reference_mask(lay))


def test_regrowth_rebuilds_the_factored_tables() -> None:
    lay = cod_sample(30, 4, 0.8, generator=torch.Generator().manual_seed(3))
    am = AmortizedMask(10, 2, grow=True)
    assert torch.equal(am.get(lay), reference_mask(lay))
    assert am.context.shape == (30, 30) and am.chain_cols.shape == (4 * 30, 3)


def test_output_buffer_is_recycled_only_when_released() -> None:
    gen = torch.Generator().manual_seed(2)
    am = AmortizedMask(30, 4)
    lays = [cod_sample(30, 4, 0.8, generator=gen) for _ in range(3)]
    first = am.get(lays[0])
    ptr = first.data_ptr()
    second = am.get(lays[1])  # `first` is still held: must not be overwritten
    assert second.data_ptr() != ptr
    assert torch.equal(first, reference_mask(lays[0])) and torch.equal(second, reference_mask(lays[1]))
    held = second[3:]  # a view keeps the buffer alive too
    del first, second
    third = am.get(lays[2])
    assert torch.equal(third, reference_mask(lays[2])) and torch.equal(held, reference_mask(lays[1])[3:])
    del held, third
    fourth = am.get(lays[0])  # nothing references the last buffer now: reused
    assert torch.equal(fourth, reference_mask(lays[0]))
    assert fourth.untyped_storage().data_ptr() == am._recycle.untyped_storage().data_ptr()


def test_explicit_out_buffer() -> None:
    lay = cod_sample(20, 3, 0.8, generator=torch.Generator().manual_seed(4)).pad_to(60)
    am = AmortizedMask(20, 3)
    buf = torch.ones(70 * 70, dtype=torch.bool)  # stale contents must not leak into the mask
    got = am.get(lay, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, reference_mask(lay))
    shuffled = _permuted(lay, torch.Generator().manual_seed(0))  # dense path honours out= too
    assert torch.equal(am.get(shuffled, out=buf), reference_mask(shuffled))
    with pytest.raises(ValueError, match="out must be"):
        am.get(lay, out=torch.ones(10, dtype=torch.bool))
