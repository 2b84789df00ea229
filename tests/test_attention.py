"""Mask-free cross-depth attention against SDPA with the brute-force mask (DESIGN §3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from peagle.attention import (
    ElementMeta,
    flex_available,
    flex_maskfree_attention,
    maskfree_attention,
)
from peagle.cod import Layout, cod_sample
from peagle.masks import reference_mask

TOL = dict(rtol=1e-10, atol=1e-10)


def _docs(n: int, gen: torch.Generator) -> torch.Tensor | None:
    """None (one document) or 2-4 contiguous documents over n rows."""
    ndocs = int(torch.randint(1, 5, (1,), generator=gen))
    if ndocs == 1 or n < 2:
        return None
    docs = torch.zeros(n, dtype=torch.int64)
    for c in torch.randint(1, n, (ndocs - 1,), generator=gen).tolist():
        docs[c:] += 1
    return docs


def _layout(gen: torch.Generator, n_max: int = 40, k_max: int = 7) -> Layout:
    n = int(torch.randint(1, n_max + 1, (1,), generator=gen))
    k = int(torch.randint(1, k_max + 1, (1,), generator=gen))
    r = float(torch.empty(1).uniform_(0.4, 1.0, generator=gen))
    lay = cod_sample(n, k, r, 0.1, generator=gen, doc_ids=_docs(n, gen))
    return lay.pad_to(len(lay) + int(torch.randint(0, 4, (1,), generator=gen)))


def _qkv(length: int, hq: int, hkv: int, gen: torch.Generator, batch: int = 2, d: int = 8):
    def t(h):
        return torch.randn(batch, h, length, d, generator=gen, dtype=torch.float64).requires_grad_()

    return t(hq), t(hkv), t(hkv)


def _dense(q, k, v, layout: Layout) -> torch.Tensor:
    # SDPA returns 0 for fully masked (padding) rows, like the mask-free path.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask(layout),
                                          enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("impl", ["fused", "checkpoint"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)])
def test_output_and_grads_match_dense_reference(impl, heads):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(10 * hq + hkv)
    for trial in range(8):
        lay = _layout(gen)
        q, k, v = _qkv(len(lay), hq, hkv, gen)
        ref = _dense(q, k, v, lay)
        grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
        # Tiles of 1 row, a few rows (tiles crossing documents and depths) and one big tile.
        for tile in (1, 5, 64):
            out = maskfree_attention(q, k, v, ElementMeta.from_layout(lay), tile_size=tile, impl=impl)
            assert_close(out, ref, **TOL)
            for got, want in zip(torch.autograd.grad(out, (q, k, v), grad_out), ref_grads):
                assert_close(got, want, **TOL)


def test_element_order_does_not_matter():
    """Any element order works (e.g. partitioned segments), not just the depth-grouped one."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        lay = _layout(gen)
        p = torch.randperm(len(lay), generator=gen)
        shuffled = Layout(lay.anchor[p], lay.depth[p], lay.doc[p], lay.valid[p])
        q, k, v = _qkv(len(lay), 2, 2, gen)
        out = maskfree_attention(q, k, v, ElementMeta.from_layout(shuffled), tile_size=4)
        assert_close(out, _dense(q, k, v, shuffled), **TOL)


def test_gradcheck_small():
    gen = torch.Generator().manual_seed(4)
    lay = cod_sample(9, 4, 0.8, generator=gen, doc_ids=torch.tensor([0] * 5 + [1] * 4)).pad_to(30)
    meta = ElementMeta.from_layout(lay)
    q, k, v = _qkv(len(lay), 2, 1, gen, batch=1, d=4)
    assert torch.autograd.gradcheck(lambda a, b, c: maskfree_attention(a, b, c, meta, tile_size=3), (q, k, v))


def test_padding_rows_are_zero_and_finite():
    gen = torch.Generator().manual_seed(5)
    lay = cod_sample(12, 5, 0.7, generator=gen).pad_to(40)
    q, k, v = _qkv(len(lay), 2, 2, gen)
    out = maskfree_attention(q, k, v, ElementMeta.from_layout(lay), tile_size=8)
    assert torch.isfinite(out).all()
    assert (out[:, :, ~lay.valid] == 0).all()
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[:, :, ~lay.valid] == 0).all()
    # An all-padding sequence gives zeros, not NaN.
    empty = ElementMeta.from_layout(cod_sample(3, 2, 1.0).pad_to(10))
    empty = ElementMeta(empty.anchor, empty.depth, empty.doc, torch.zeros(10, dtype=torch.bool))
    q, k, v = _qkv(10, 2, 2, gen)
    assert (maskfree_attention(q, k, v, empty) == 0).all()


def test_float32_is_close_and_bfloat16_runs():
    gen = torch.Generator().manual_seed(6)
    lay = cod_sample(50, 6, 0.8, generator=gen)
    q, k, v = (t.detach().float() for t in _qkv(len(lay), 4, 2, gen))
    meta = ElementMeta.from_layout(lay)
    assert_close(maskfree_attention(q, k, v, meta, tile_size=16), _dense(q, k, v, lay), rtol=1e-5, atol=1e-5)
    out = maskfree_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), meta, tile_size=16)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), _dense(q, k, v, lay), rtol=0.05, atol=0.05)


def test_meta_api_and_errors():
    lay = cod_sample(6, 3, 1.0)
    meta = ElementMeta.from_layout(lay)
    assert meta[None] is meta and meta.to("cpu") is meta and len(meta) == len(lay)
    with pytest.raises(TypeError):
        meta[0]
    q = torch.randn(1, 2, len(lay), 4)
    with pytest.raises(ValueError, match="elements"):
        maskfree_attention(q[:, :, :-1], q[:, :, :-1], q[:, :, :-1], meta)
    with pytest.raises(ValueError, match="divide"):
        maskfree_attention(q, q[:, :1].expand(1, 3, -1, -1), q[:, :1].expand(1, 3, -1, -1), meta)
    dup = ElementMeta(torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="twice"):
        maskfree_attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), dup)
    # The rule helper agrees with the brute-force mask.
    lay = _layout(torch.Generator().manual_seed(7))
    i = torch.arange(len(lay))
    assert torch.equal(ElementMeta.from_layout(lay).allowed(i[:, None], i[None, :]), reference_mask(lay))


def _tiny_drafter():
    from peagle.drafters import DrafterSpec, build_drafter

    spec = DrafterSpec(hidden_size=32, vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                       intermediate_size=48, mask_token_id=49, aux_layer_ids=[0, 1, 2])
    return build_drafter(spec, seed=0).double()


def test_drafter_maskfree_equals_dense_amortized():
    from peagle.example import MaskBuilder, build_example
    from peagle.losses import example_loss

    gen = torch.Generator().manual_seed(8)
    n, k = 37, 5
    docs = torch.tensor([0] * 15 + [1] * 22)
    lay = cod_sample(n, k, 0.8, generator=gen, doc_ids=docs)
    rows = {"input_ids": torch.randint(0, 49, (n,), generator=gen),
            "aux_hidden": torch.randn(n, 96, generator=gen, dtype=torch.float64),
            "target_hidden": torch.randn(n, 32, generator=gen, dtype=torch.float64),
            "loss_mask": (torch.rand(n, generator=gen) < 0.8).to(torch.uint8)}
    ex = build_example(rows, lay, mask_token_id=49)
    target_head = torch.randn(50, 32, generator=gen, dtype=torch.float64)
    results = {}
    for strategy in ("amortized", "maskfree"):
        drafter = _tiny_drafter()
        mask = MaskBuilder(strategy, 64, k)(lay, n)
        assert isinstance(mask, ElementMeta) == (strategy == "maskfree")
        logits = drafter(ex.input_ids[None], ex.hidden[None], ex.is_mask[None], ex.positions[None], mask[None])
        loss, _ = example_loss(drafter, target_head, ex, mask, "kl", k)
        loss.backward()
        results[strategy] = (logits, loss, {n_: p.grad for n_, p in drafter.named_parameters()})
    (l_d, loss_d, g_d), (l_m, loss_m, g_m) = results["amortized"], results["maskfree"]
    assert_close(l_m, l_d, **TOL)
    assert_close(loss_m, loss_d, **TOL)
    assert g_d.keys() == g_m.keys()
    for name in g_d:
        assert_close(g_m[name], g_d[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_drafter_rejects_cache_with_meta():
    from peagle.drafters import KVCache

    drafter = _tiny_drafter()
    lay = cod_sample(4, 2, 1.0)
    with pytest.raises(ValueError, match="KV cache"):
        drafter(torch.zeros(1, len(lay), dtype=torch.long), None, torch.ones(1, len(lay), dtype=torch.bool),
                lay.positions[None], ElementMeta.from_layout(lay), cache=KVCache(2))


@pytest.mark.skipif(not flex_available(), reason="FlexAttention is not available in this torch")
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_matches_dense(compile):
    # compiled: the call runs padded to its bucket (230 -> 256 elements), as on a GPU
    gen = torch.Generator().manual_seed(9)
    lay = cod_sample(60, 5, 0.8, generator=gen, doc_ids=torch.tensor([0] * 25 + [1] * 35)).pad_to(230)
    q, k, v = (t.detach().float() for t in _qkv(len(lay), 4, 2, gen, d=16))
    out = flex_maskfree_attention(q, k, v, ElementMeta.from_layout(lay), compile=compile)
    ref = _dense(q, k, v, lay)
    assert_close(out[:, :, lay.valid], ref[:, :, lay.valid], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


def test_flex_buckets_bound_the_kernels_and_padding_changes_nothing():
    from peagle.attention import flex_bucket

    assert [flex_bucket(n) for n in (1, 128, 129, 300, 385, 1025, 20480)] == [128, 128, 256, 384, 512, 1536, 24576]
    buckets = {flex_bucket(n) for n in range(1, 20481)}
    assert len(buckets) == 15 and all(flex_bucket(n) < 1.5 * n + 128 for n in range(1, 20481))
    if not flex_available():
        pytest.skip("FlexAttention is not available in this torch")
    gen = torch.Generator().manual_seed(4)
    lay = cod_sample(50, 4, 0.8, generator=gen, doc_ids=torch.tensor([0] * 20 + [1] * 30))
    q, k, v = (t.detach().float() for t in _qkv(len(lay), 4, 2, gen, d=16))
    meta = ElementMeta.from_layout(lay)
    plain = flex_maskfree_attention(q, k, v, meta, compile=False, bucket=False)
    padded = flex_maskfree_attention(q, k, v, meta, compile=False, bucket=True)
    assert padded.shape == plain.shape
    assert_close(padded, plain, rtol=0, atol=1e-6)
    assert len(meta.pad_to(flex_bucket(len(lay)))) == flex_bucket(len(lay))
