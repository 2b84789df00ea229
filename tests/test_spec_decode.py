"""The engine is lossless, its accounting exact, and the drafter's inference pass matches training."""

import pytest
import torch

from peagle.cod import cod_sample, full_grid
from peagle.drafters import DrafterSpec, build_drafter
from peagle.masks import AmortizedMask, reference_mask
from peagle.spec_decode import (OracleProposer, PEagleProposer, SpeculativeDecoder, TargetRunner,
                                greedy_generate)
from peagle.example import build_example

AUX = [1, 2, 3]
MASK_ID = 96


def make_drafter(layers=2, seed=0):
    spec = DrafterSpec(hidden_size=64, vocab_size=97, num_layers=layers, num_heads=2, num_kv_heads=1,
                       head_dim=32, intermediate_size=96, mask_token_id=MASK_ID, aux_layer_ids=AUX)
    return build_drafter(spec, seed=seed).to(torch.float64).eval()


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 95, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_engine_is_lossless(tiny_llama, k):
    runner = TargetRunner(tiny_llama, AUX)
    engine = SpeculativeDecoder(runner, PEagleProposer(make_drafter()), k=k, eos_id=5)
    for p in prompts(4):
        ref = greedy_generate(runner, p, 40, eos_id=5)
        out, stats = engine.generate(p, 40)
        assert out == ref
        assert 1.0 <= stats.acceptance_length <= k + 1


@pytest.mark.parametrize("k", [1, 4, 7])
def test_oracle_drafter_reaches_k_plus_one(tiny_llama, k):
    runner = TargetRunner(tiny_llama, AUX)
    for p in prompts(3, seed=2):
        # The last round may draft past the request's end: the oracle knows k tokens more.
        ref = greedy_generate(runner, p, 30 + k, eos_id=None)
        engine = SpeculativeDecoder(runner, OracleProposer(ref, len(p)), k=k, eos_id=None)
        out, stats = engine.generate(p, 30)
        assert out == ref[:30]
        assert stats.acceptance_length == k + 1
        assert stats.per_position_acceptance() == [1.0] * k


def test_rejecting_drafter_commits_one_token_per_round(tiny_llama):
    """A drafter that is always wrong still yields the greedy output, one token per round."""
    runner = TargetRunner(tiny_llama, AUX)
    p = prompts(1, seed=3)[0]
    ref = greedy_generate(runner, p, 20, eos_id=None)
    wrong = [(t + 1) % 97 for t in ref] + [0] * 8
    engine = SpeculativeDecoder(runner, OracleProposer(wrong, len(p)), k=3, eos_id=None)
    out, stats = engine.generate(p, 20)
    assert out == ref
    assert stats.acceptance_length == 1.0
    assert stats.rounds == 19  # the prefill yields the first token


def _rows(n, h=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 95, (n,), generator=g),
        "aux_hidden": torch.randn(n, 3 * h, generator=g, dtype=torch.float64),
        "target_hidden": torch.randn(n, h, generator=g, dtype=torch.float64),
        "loss_mask": torch.ones(n, dtype=torch.uint8),
    }


@pytest.mark.parametrize("layout_kind", ["full", "cod"])
def test_training_chain_equals_inference_pass(layout_kind):
    """Logits of a chain inside a training super-sequence == the single inference-time pass."""
    drafter = make_drafter(layers=3, seed=4)
    n, k = 23, 5
    rows = _rows(n)
    layout = full_grid(n, k) if layout_kind == "full" else cod_sample(n, k, 0.7, generator=torch.Generator().manual_seed(5))
    ex = build_example(rows, layout, MASK_ID)
    mask = AmortizedMask(64, k).get(layout)
    assert torch.equal(mask, reference_mask(layout))
    train_logits = drafter(ex.input_ids[None], ex.hidden[None], ex.is_mask[None], ex.positions[None], mask[None])[0]
    checked = 0
    for a in range(n):
        chain = [(i, int(d)) for i, (an, d) in enumerate(zip(layout.anchor.tolist(), layout.depth.tolist())) if an == a]
        depth_len = len(chain)
        if depth_len < 2:
            continue
        # Inference: rows 0..a are real context, then depth_len-1 mask slots, plain causal attention.
        ids = torch.cat([rows["input_ids"][:a + 1], torch.full((depth_len - 1,), MASK_ID)])
        hidden = torch.cat([rows["aux_hidden"][:a + 1], torch.zeros(depth_len - 1, 192, dtype=torch.float64)])
        is_mask = torch.arange(a + depth_len) > a
        pos = torch.arange(a + depth_len)
        inf_logits = drafter(ids[None], hidden[None], is_mask[None], pos[None])[0][a:]
        idx = [i for i, _ in sorted(chain, key=lambda c: c[1])]
        torch.testing.assert_close(train_logits[idx], inf_logits, rtol=1e-9, atol=1e-9)
        checked += 1
    assert checked > 3


def test_incremental_proposer_equals_single_pass():
    """The proposer's KV-cached rounds give the same drafts as one pass over the whole context."""
    drafter = make_drafter(seed=7)
    rows = _rows(30, seed=8)
    tokens = [1] + rows["input_ids"].tolist()  # tokens[i+1] is row i's token
    inc = PEagleProposer(drafter)
    for end in (5, 6, 11, 19, 30):  # rounds that commit several rows at once
        drafts = inc.propose(tokens[:end + 1], rows["aux_hidden"][:end], 4)
        fresh = PEagleProposer(drafter)
        assert drafts == fresh.propose(tokens[:end + 1], rows["aux_hidden"][:end], 4)


@pytest.mark.parametrize("variant", ["shared", "depth_encoding", "ntp_depth_encoding", "ntp", "regularized_ntp"])
def test_every_hidden_variant_drafts_at_inference_what_training_scores(variant):
    """Table 3's designs of the mask slots' hidden input: the proposer's one pass gives, for every
    anchor, the argmax of the chain's logits inside a training super-sequence (the anchor's own
    features and the slot's depth reach the mask slots the same way in both)."""
    spec = DrafterSpec(hidden_size=64, vocab_size=97, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                       intermediate_size=96, mask_token_id=MASK_ID, aux_layer_ids=AUX, hidden_variant=variant,
                       max_depth=4)
    drafter = build_drafter(spec, seed=3).to(torch.float64).eval()
    with torch.no_grad():  # away from their initial values, so that each design's terms matter
        if drafter.depth_hidden is not None:
            drafter.depth_hidden.normal_(generator=torch.Generator().manual_seed(0))
        if drafter.ntp_alpha is not None:
            drafter.ntp_alpha.fill_(0.7)
    assert (variant in ("shared", "ntp")) == (set(drafter.state_dict()) == set(make_drafter().state_dict()))
    n, k = 17, 5
    rows = _rows(n, seed=2)
    layout = full_grid(n, k)
    ex = build_example(rows, layout, MASK_ID)
    logits = drafter(ex.input_ids[None], ex.hidden[None], ex.is_mask[None], ex.positions[None],
                     AmortizedMask(64, k).get(layout)[None], depths=layout.depth[None])[0]
    tokens = [1] + rows["input_ids"].tolist()
    differs = 0
    for a in range(n - k):
        chain = [i for _, i in sorted((int(d), i) for i, an in enumerate(layout.anchor.tolist()) if an == a
                                      for d in [layout.depth[i]])]
        drafts = PEagleProposer(drafter).propose(tokens[:a + 2], rows["aux_hidden"][:a + 1], k)
        assert drafts == logits[chain].argmax(-1).tolist()
        differs += drafts != PEagleProposer(make_drafter()).propose(tokens[:a + 2], rows["aux_hidden"][:a + 1], k)
    assert differs  # not trivially the shared drafter
