"""EAGLE-3 baseline: the training-time test is the DESIGN §3 rule, it matches inference, decoding is
lossless, and exports are what vLLM loads (no mask_hidden, no mask-token keys)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peagle import checkpoint as ckpt
from peagle.cod import full_grid
from peagle.drafters import DrafterSpec, build_drafter
from peagle.eagle3 import ttt_hidden, ttt_loss
from peagle.masks import reference_mask
from peagle.spec_decode import (Eagle3Proposer, PEagleProposer, SpeculativeDecoder, TargetRunner,
                                greedy_generate, make_proposer)
from peagle.losses import distill_loss

AUX = [1, 2, 3]
MASK_ID = 96
H, V = 64, 97


def make_drafter(parallel=False, layers=1, seed=0, scramble=True):
    spec = DrafterSpec(hidden_size=H, vocab_size=V, num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=32,
                       intermediate_size=96, mask_token_id=MASK_ID, aux_layer_ids=AUX, parallel=parallel)
    model = build_drafter(spec, seed=seed).to(torch.float64)
    if scramble:
        # The 0.02-std init makes attention nearly uniform; O(1) weights make every key matter.
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
                p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else
                        noise * (1.0 if p.dim() != 2 or "embed" in name else 1.5 / p.shape[1] ** 0.5))
    return model


def make_rows(n, seed=0, mask_p=0.3):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 95, (n,), generator=g),
        "aux_hidden": torch.randn(n, 3 * H, generator=g, dtype=torch.float64),
        "target_hidden": torch.randn(n, H, generator=g, dtype=torch.float64),
        "loss_mask": (torch.rand(n, generator=g) > mask_p).to(torch.uint8),
    }


def target_head(seed=1):
    return torch.randn(V, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / H**0.5


def brute_force_ttt(drafter, rows, steps, decay, kind, head):
    """TTT by S full-grid forwards under ``reference_mask`` (the DESIGN §3 oracle).

    Iteration s feeds each element its hidden input explicitly: fc(g_a) at depth 0, iteration
    s-1's pre-norm output of element (a, d-1) at depth d >= 1; its depth-s outputs are step s.
    Returns (per-step logits [m_s, V], loss).
    """
    n = rows["input_ids"].shape[0]
    layout = full_grid(n, steps)
    a, d = layout.anchor, layout.depth
    mask = reference_mask(layout)[None]
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(zip(a, d))}
    parent = torch.tensor([index[(int(x), int(y) - 1)] if y > 0 else i for i, (x, y) in enumerate(zip(a, d))])
    g_fc = drafter.fc(rows["aux_hidden"])[a]  # [L, H]
    prev = torch.zeros_like(g_fc)
    logits, loss = [], 0.0
    for s in range(layout.num_depths):
        hidden = torch.where((d == 0)[:, None], g_fc, prev[parent])
        normed, pre = drafter.forward_hidden(rows["input_ids"][a + d][None], hidden[None], None, (a + d)[None], mask,
                                             return_prenorm=True)
        prev = pre[0]
        logits.append(drafter.lm_head(normed[0][d == s]))  # anchors 0..n-1-s in order
        gate = rows["loss_mask"][s:].bool()
        if gate.any():
            tl = rows["target_hidden"][s:][gate] @ head.T
            loss = loss + decay**s * distill_loss(logits[-1][gate], tl, kind) / int(gate.sum())
    return logits, loss


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_ttt_equals_full_grid_brute_force(kind):
    """Per-step logits, loss, stats and gradients of ttt_loss == S full-grid forwards (float64)."""
    drafter = make_drafter(layers=2, seed=1)  # 2 layers + GQA exercise every path of StepAttention
    rows, head, steps = make_rows(11, seed=2), target_head(), 4
    ref_logits, ref_loss = brute_force_ttt(drafter, rows, steps, 0.8, kind, head)
    ref_grads = torch.autograd.grad(ref_loss, list(drafter.parameters()))

    outs = ttt_hidden(drafter, rows["input_ids"], rows["aux_hidden"], steps)
    assert [o.shape[0] for o in outs] == [11, 10, 9, 8]
    for s in range(steps):
        torch.testing.assert_close(drafter.lm_head(outs[s]), ref_logits[s], rtol=0, atol=1e-10)
    loss, stats = ttt_loss(drafter, head, rows, steps, decay=0.8, kind=kind)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, list(drafter.parameters()))
    for (name, _), g, rg in zip(drafter.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10, msg=name)
    assert any(float(g.abs().max()) > 1e-3 for g in grads)  # the comparison is not vacuous

    gates = [rows["loss_mask"][s:].bool() for s in range(steps)]
    assert stats["count"].tolist() == [int(g.sum()) for g in gates]
    hits = [int((ref_logits[s][g].argmax(-1) == (rows["target_hidden"][s:][g] @ head.T).argmax(-1)).sum())
            for s, g in enumerate(gates)]
    assert stats["correct"].tolist() == hits
    assert stats["elements"] == 11 + 10 + 9 + 8 and stats["supervised"] == sum(stats["count"].tolist())


def test_ttt_mask_matters():
    """Steps >= 1 differ from a plain causal pass over the same inputs (the chain keys are used)."""
    drafter = make_drafter(seed=3)
    rows = make_rows(8, seed=4)
    outs = ttt_hidden(drafter, rows["input_ids"], rows["aux_hidden"], 3)
    # Step 1 at row i as if it were an ordinary causal row: same token/position/hidden, no chain key.
    _, pre0 = drafter.forward_hidden(rows["input_ids"][None], rows["aux_hidden"][None], None,
                                     torch.arange(8)[None], return_prenorm=True)
    plain = drafter.forward_hidden(rows["input_ids"][None, 1:], pre0[:, :7], None, torch.arange(1, 8)[None])[0]
    assert (plain - outs[1]).abs().max() > 1e-3


@pytest.mark.parametrize("n,steps", [(1, 1), (1, 4), (3, 7), (5, 2)])
def test_ttt_short_sequences_and_more_steps_than_rows(n, steps):
    drafter = make_drafter(seed=5)
    rows = make_rows(n, seed=6, mask_p=-1)  # all supervised
    loss, stats = ttt_loss(drafter, target_head(), rows, steps)
    assert torch.isfinite(loss) and loss > 0
    assert stats["count"].tolist() == [max(n - s, 0) for s in range(steps)]
    assert stats["elements"] == sum(max(n - s, 0) for s in range(steps))
    loss.backward()
    assert drafter.fc.weight.grad is not None


def test_ttt_without_supervision_is_a_harmless_zero():
    drafter = make_drafter(seed=5)
    rows = make_rows(6, seed=6)
    rows["loss_mask"][:] = 0
    loss, stats = ttt_loss(drafter, target_head(), rows, 3)
    assert float(loss.detach()) == 0.0 and stats["supervised"] == 0 and stats["elements"] == 6 + 5 + 4
    (loss / 4).backward()  # what the trainer does; must not raise
    assert all(p.grad is None for p in drafter.parameters())


def test_ttt_skips_steps_after_the_last_supervised_one():
    """Only rows >= s feed step s's loss: a loss mask on row 0 alone trains step 0 only."""
    drafter = make_drafter(seed=7)
    rows = make_rows(6, seed=8)
    rows["loss_mask"][:] = 0
    rows["loss_mask"][0] = 1
    loss, stats = ttt_loss(drafter, target_head(), rows, 3)
    assert stats["count"].tolist() == [1, 0, 0]
    ref = distill_loss(drafter.lm_head(ttt_hidden(drafter, rows["input_ids"], rows["aux_hidden"], 1)[0][:1]),
                       rows["target_hidden"][:1] @ target_head().T, "kl")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)


def test_ttt_steps_equal_teacher_forced_inference():
    """TTT step-s logits at row i == the proposer's draft s+1 after real rows 0..i, fed the true tokens."""
    drafter = make_drafter(layers=2, seed=9).eval()
    n, steps = 14, 4
    rows = make_rows(n, seed=10)
    with torch.no_grad():
        ttt = [drafter.lm_head(o) for o in ttt_hidden(drafter, rows["input_ids"], rows["aux_hidden"], steps)]
    tokens = [3] + rows["input_ids"].tolist()  # tokens[i + 1] is row i's token
    proposer = Eagle3Proposer(drafter)  # one proposer: rounds reuse and crop its KV cache
    checked = 0
    for i in (0, 1, 2, 5, 6, 10, 13):
        k = min(steps, n - i)
        forced = rows["input_ids"][i + 1:i + k].tolist()
        _, logits = proposer.draft_logits(tokens[:i + 2], rows["aux_hidden"][:i + 1], k, forced=forced)
        assert proposer.cache.length == i + 1
        for s in range(k):
            torch.testing.assert_close(logits[s], ttt[s][i], rtol=0, atol=1e-10)
            checked += 1
    assert checked > 15


def test_incremental_eagle3_proposer_equals_fresh():
    drafter = make_drafter(seed=11).eval()
    rows = make_rows(25, seed=12)
    tokens = [1] + rows["input_ids"].tolist()
    inc = Eagle3Proposer(drafter)
    for end in (4, 5, 9, 17, 25):
        drafts = inc.propose(tokens[:end + 1], rows["aux_hidden"][:end], 5)
        assert len(drafts) == 5
        assert drafts == Eagle3Proposer(drafter).propose(tokens[:end + 1], rows["aux_hidden"][:end], 5)


def test_make_proposer_dispatches_on_spec():
    assert isinstance(make_proposer(make_drafter(parallel=False, scramble=False)), Eagle3Proposer)
    assert isinstance(make_proposer(make_drafter(parallel=True, scramble=False)), PEagleProposer)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_eagle3_decoding_is_lossless(tiny_llama, k):
    runner = TargetRunner(tiny_llama, AUX)
    engine = SpeculativeDecoder(runner, make_proposer(make_drafter(seed=k).eval()), k=k, eos_id=5)
    g = torch.Generator().manual_seed(13)
    for _ in range(3):
        p = torch.randint(0, 95, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        ref = greedy_generate(runner, p, 24, eos_id=5)
        out, stats = engine.generate(p, 24)
        assert out == ref
        assert stats.rounds == 0 or 1.0 <= stats.acceptance_length <= k + 1  # rounds 0: first token was EOS


# --------------------------------------------------------------------------- drafter / export


def test_eagle3_drafter_inputs():
    """No mask_hidden; H-wide hidden inputs bypass fc; mask slots are refused."""
    drafter = make_drafter(seed=14)
    assert drafter.mask_hidden is None and "mask_hidden" not in drafter.state_dict()
    g = torch.randn(1, 5, 3 * H, dtype=torch.float64)
    ids, pos = torch.randint(0, 95, (1, 5)), torch.arange(5)[None]
    with torch.no_grad():
        torch.testing.assert_close(drafter(ids, g, None, pos), drafter(ids, drafter.fc(g), None, pos), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no mask slots"):
        drafter(ids, g, torch.ones(1, 5, dtype=torch.bool), pos)
    with pytest.raises(ValueError, match="width"):
        drafter(ids, g[..., :100], None, pos)


def _save(tmp_path, parallel, layers=1, name=None):
    model = make_drafter(parallel=parallel, layers=layers, seed=15).float()
    path = tmp_path / (name or ("peagle" if parallel else "eagle3"))
    ckpt.save_drafter(path, model, {"method": "peagle" if parallel else "eagle3"})
    return model, path


@pytest.mark.parametrize("parallel", [False, True])
def test_export_round_trip_and_check(tmp_path, parallel):
    model, path = _save(tmp_path, parallel, layers=2)
    ckpt.check_export(path)
    cfg = json.loads((path / "config.json").read_text())
    names = set(load_file(str(path / "model.safetensors")))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and "embed_tokens.weight" in names
    assert all((k in cfg) == parallel for k in ("mask_token_id", "pard_token", "ptd_token_id"))
    assert ("mask_hidden" in names) == parallel
    loaded, _ = ckpt.load_drafter(path)
    assert loaded.spec == model.spec and loaded.spec.parallel == parallel
    ids, g, pos = torch.randint(0, 95, (1, 6)), torch.randn(1, 6, 3 * H), torch.arange(6)[None]
    with torch.no_grad():
        assert torch.equal(loaded(ids, g, None, pos), model.eval()(ids, g, None, pos))


def test_old_checkpoint_without_parallel_field_loads_as_peagle(tmp_path):
    _, path = _save(tmp_path, True)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["peagle"]["spec"]["parallel"]
    (path / "config.json").write_text(json.dumps(cfg))
    loaded, _ = ckpt.load_drafter(path)
    assert loaded.spec.parallel and loaded.mask_hidden is not None
    ckpt.check_export(path)


def test_export_check_accepts_midlayer_names(tmp_path):
    _, path = _save(tmp_path, False)
    w = load_file(str(path / "model.safetensors"))
    save_file({k.replace("layers.0.", "midlayer.") : v for k, v in w.items()}, str(path / "model.safetensors"))
    ckpt.check_export(path)


def _edit_config(fn):
    def apply(path):
        cfg = json.loads((path / "config.json").read_text())
        fn(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    return apply


def _edit_weights(fn):
    def apply(path):
        w = load_file(str(path / "model.safetensors"))
        fn(w)
        save_file(w, str(path / "model.safetensors"))
    return apply


BROKEN = {
    "no config": (True, lambda p: (p / "config.json").unlink(), "config.json: missing"),
    "bad json": (True, lambda p: (p / "config.json").write_text("{"), "config.json: not valid JSON"),
    "architecture": (False, _edit_config(lambda c: c.update(architectures=["LlamaForCausalLM"])), "architectures"),
    "no draft vocab": (False, _edit_config(lambda c: c.pop("draft_vocab_size")), "draft_vocab_size"),
    "bad heads": (False, _edit_config(lambda c: c.update(num_attention_heads=0)), "num_attention_heads"),
    "dup aux ids": (True, _edit_config(lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 1, 3])),
                    "three distinct"),
    "two aux ids": (False, _edit_config(lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 3])), "three distinct"),
    "missing pard_token": (True, _edit_config(lambda c: c.pop("pard_token")), "pard_token"),
    "mask id mismatch": (True, _edit_config(lambda c: c.update(ptd_token_id=3)), "mask token"),
    "mask key on eagle3": (False, _edit_config(lambda c: c.update(mask_token_id=MASK_ID)), "must not carry"),
    "norm before residual": (False, _edit_config(lambda c: c.update(norm_before_residual=True)),
                             "norm_before_residual"),
    "no weights": (False, lambda p: (p / "model.safetensors").unlink(), "model.safetensors: missing"),
    "corrupt weights": (False, lambda p: (p / "model.safetensors").write_bytes(b"\x08junk"), "unreadable"),
    "no mask_hidden": (True, _edit_weights(lambda w: w.pop("mask_hidden")), "missing tensors ['mask_hidden']"),
    "mask_hidden on eagle3": (False, _edit_weights(lambda w: w.update(mask_hidden=torch.zeros(1, 1, 3 * H))),
                              "has mask_hidden"),
    "mask_hidden shape": (True, _edit_weights(lambda w: w.update(mask_hidden=torch.zeros(3 * H))), "mask_hidden has shape"),
    "fc shape": (False, _edit_weights(lambda w: w.update({"fc.weight": torch.zeros(H, 2 * H)})), "fc.weight has shape"),
    "no lm_head": (False, _edit_weights(lambda w: w.pop("lm_head.weight")), "lm_head.weight"),
    "model. prefix": (False, _edit_weights(lambda w: w.update({"model.norm.weight": w.pop("norm.weight")})),
                      "unexpected tensors ['model.norm.weight']"),
    "int weights": (False, _edit_weights(lambda w: w.update({"norm.weight": torch.ones(H, dtype=torch.int32)})),
                    "dtype"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_export_check_rejects_broken_copies(tmp_path, case):
    parallel, breaker, message = BROKEN[case]
    _, path = _save(tmp_path, parallel)
    ckpt.check_export(path)
    breaker(path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_export(path)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)
