"""Drafter training: checkpoints round-trip, a killed run resumes to the same weights, loss falls."""

import json
import math
from pathlib import Path

import pytest
import torch

from peagle import checkpoint as ckpt
from peagle.cod import full_grid
from peagle.drafters import DrafterSpec, build_drafter
from peagle.example import build_example
from peagle.losses import distill_loss
from peagle.train import _Killed, train_drafter


def test_checkpoint_round_trip(tmp_path):
    spec = DrafterSpec(hidden_size=64, vocab_size=50, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                       intermediate_size=80, mask_token_id=49, aux_layer_ids=[1, 2, 3])
    model = build_drafter(spec, seed=3)
    ckpt.save_drafter(tmp_path / "d", model, {"method": "peagle", "k_train": 4})
    loaded, cfg = ckpt.load_drafter(tmp_path / "d")
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["mask_token_id"] == cfg["pard_token"] == cfg["ptd_token_id"] == 49
    names = set(loaded.state_dict())
    assert {"fc.weight", "embed_tokens.weight", "layers.0.hidden_norm.weight", "layers.0.self_attn.q_proj.weight",
            "layers.1.mlp.down_proj.weight", "norm.weight", "lm_head.weight", "mask_hidden"} <= names
    assert "layers.1.hidden_norm.weight" not in names and not any(n.startswith("model.") for n in names)
    assert loaded.layers[0].self_attn.q_proj.weight.shape == (64, 128)  # layer 0 reads [embed, hidden]
    assert loaded.state_dict()["mask_hidden"].shape == (1, 1, 192)
    assert not (tmp_path / "d.tmp").exists()


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="config.json"):
        ckpt.load_drafter(tmp_path)


def test_build_example_pairs_rows_and_targets():
    """Element (a, d): token of row a at depth 0 else mask; target row a + d; position a + d."""
    n, h = 6, 2
    rows = {"input_ids": torch.arange(100, 100 + n), "aux_hidden": torch.arange(n * 3 * h).view(n, 3 * h).float(),
            "target_hidden": torch.arange(n * h).view(n, h).float(), "loss_mask": torch.tensor([0, 1, 1, 1, 1, 0])}
    ex = build_example(rows, full_grid(n, 3), mask_token_id=7)
    el = {(int(a), int(d)): i for i, (a, d) in enumerate(zip(ex.layout.anchor, ex.layout.depth))}
    i = el[(2, 0)]
    assert ex.input_ids[i] == 102 and not ex.is_mask[i] and ex.positions[i] == 2 and ex.gate[i]
    assert torch.equal(ex.hidden[i], rows["aux_hidden"][2]) and torch.equal(ex.target_hidden[i], rows["target_hidden"][2])
    i = el[(2, 2)]
    assert ex.input_ids[i] == 7 and ex.is_mask[i] and ex.positions[i] == 4 and ex.gate[i]
    assert torch.equal(ex.target_hidden[i], rows["target_hidden"][4])
    assert not ex.gate[el[(3, 2)]]  # row 5 is outside the loss mask
    assert (3, 3) not in el and (4, 2) not in el  # targets past the sequence do not exist


def test_kl_loss_is_zero_iff_distributions_match():
    t = torch.randn(5, 11, dtype=torch.float64)
    assert distill_loss(t, t, "kl").abs() < 1e-12
    assert distill_loss(t + torch.randn(5, 11, dtype=torch.float64), t, "kl") > 0


def _weights(path):
    return ckpt.load_drafter(path)[0].state_dict()


def test_training_reduces_loss_and_writes_metrics(tiny_artifacts, tiny_config, tmp_path):
    summary = train_drafter(tiny_config, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "peagle", 32,
                            tmp_path / "run", progress=False, log=lambda m: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, summary["optimizer_steps"] + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert {"tokens_per_s", "peak_mem_mb", "acc_d0", "acc_d3"} <= set(rows[0])
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_after_kill_matches_uninterrupted(tiny_artifacts, tiny_config, tmp_path):
    args = (tiny_config, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "peagle", 24)
    train_drafter(*args, tmp_path / "straight", progress=False, log=lambda m: None)
    with pytest.raises(_Killed):
        train_drafter(*args, tmp_path / "killed", stop_after_steps=5, progress=False, log=lambda m: None)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "killed" / "checkpoints")][-1] == "step_0000004"
    train_drafter(*args, tmp_path / "killed", progress=False, log=lambda m: None)
    a, b = _weights(tmp_path / "straight" / "final"), _weights(tmp_path / "killed" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    m1 = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    m2 = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in m1] == [json.loads(x)["loss"] for x in m2]


def _bf16_half_ulp(w: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bfloat16 numbers (8 significant bits) around each value of ``w``."""
    return torch.ldexp(torch.ones_like(w), torch.floor(torch.log2(w.abs().clamp_min(1e-30))).int() - 8)


def test_bf16_training_keeps_fp32_master_weights(tiny_artifacts, tiny_config, tmp_path):
    """runtime.dtype bfloat16 trains under bf16 autocast with fp32 weights and AdamW moments: an
    update smaller than one bf16 rounding step of a weight still changes it (in pure bf16 every
    change would be a multiple of that step)."""
    from dataclasses import replace

    cfg = replace(tiny_config, runtime=replace(tiny_config.runtime, dtype="bfloat16"),
                  train=replace(tiny_config.train, lr=1e-5, warmup_ratio=0.0, epochs=1))
    out = tmp_path / "bf16"
    args = (cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "peagle", 24, out)
    with pytest.raises(_Killed):  # keep the step-2 checkpoint, then resume to the end (step 4)
        train_drafter(*args, stop_after_steps=2, progress=False, log=lambda m: None)
    before = _weights(out / "checkpoints" / "step_0000002")
    train_drafter(*args, progress=False, log=lambda m: None)
    after = _weights(out / "final")
    from safetensors import safe_open

    with safe_open(str(out / "final" / "model.safetensors"), "pt") as f:  # the master weights, as saved
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    w0, w1 = before["layers.0.mlp.down_proj.weight"], after["layers.0.mlp.down_proj.weight"]
    delta = (w1 - w0).abs()
    small = (delta > 0) & (delta < _bf16_half_ulp(w0))
    assert float(small.float().mean()) > 0.5, "updates below bf16 resolution were lost"
    assert all(math.isfinite(json.loads(x)["loss"]) for x in (out / "metrics.jsonl").read_text().splitlines())
    with pytest.raises(Exception, match=r"runtime.dtype float16 .* train in bfloat16"):
        train_drafter(replace(cfg, runtime=replace(cfg.runtime, dtype="float16")), tiny_artifacts["target_json"],
                      tiny_artifacts["hidden_dir"], "peagle", 24, tmp_path / "fp16", progress=False, log=lambda m: None)


def test_context_beyond_the_precomputed_mask_is_a_clear_error(tiny_artifacts, tiny_config, tmp_path):
    from dataclasses import replace

    from peagle.example import TrainingError

    cfg = replace(tiny_config, train=replace(tiny_config.train, max_mask_len=16))
    with pytest.raises(TrainingError, match="train.max_mask_len"):
        train_drafter(cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "peagle", 40,
                      tmp_path / "run", progress=False, log=lambda m: None)
    assert not (tmp_path / "run" / "final").exists()


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from peagle.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: tiny\nresults_dir: r\ntrain: {epoch: 3}\n")
    assert main(["train", "--config", str(bad), "--target", "t.json", "--hidden-dir", "h", "--method", "peagle",
                 "--ctx", "64", "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown key train.epoch" in err and str(bad) in err and "Traceback" not in err


# --------------------------------------------------------------------------- methods and budgets


def _quiet():
    return dict(progress=False, log=lambda m: None)


def test_method_plans_resolve_defaults(tiny_config):
    from peagle.train import MethodPlan

    pe, ps, e3 = (MethodPlan.of(tiny_config, m) for m in ("peagle", "parallelspec", "eagle3"))
    assert (pe.num_layers, pe.cod, pe.parallel, pe.depths) == (tiny_config.drafter.num_layers, True, True, 4)
    assert (ps.num_layers, ps.cod) == (1, False)
    assert (e3.num_layers, e3.parallel, e3.embed_trainable, e3.depths) == (1, False, False, 7)
    assert MethodPlan.of(tiny_config, "pard").mask_strategy == "pard"


@pytest.mark.parametrize("method", ["parallelspec", "pard", "eagle3"])
def test_every_method_trains_through_the_same_loop(method, tiny_artifacts, tiny_config, tmp_path):
    from peagle.cod import expected_elements
    from peagle.hidden import HiddenStateDataset
    from peagle.target import load_target

    summary = train_drafter(tiny_config, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], method, 32,
                            tmp_path / "run", **_quiet())
    assert summary["status"] == "ok" and summary["method"] == method
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    model, cfg = ckpt.load_drafter(tmp_path / "run" / "final")
    assert model.spec.num_layers == summary["drafter_layers"] == (2 if method == "pard" else 1)
    if method == "eagle3":
        assert not model.spec.parallel and "mask_hidden" not in model.state_dict()
        assert "mask_token_id" not in cfg and {"acc_d0", "acc_d6"} <= set(rows[0])
        target = load_target(tiny_artifacts["target_json"])[0]
        assert torch.equal(model.embed_tokens.weight, target.get_input_embeddings().weight)  # frozen
    if method == "parallelspec":  # the full n x K grid, no COD: more elements than COD keeps
        data = HiddenStateDataset(tiny_artifacts["hidden_dir"])
        n = min(32, int(data[0]["input_ids"].shape[0])) - 1
        assert len(full_grid(n, tiny_config.train.k_train)) > expected_elements(n, tiny_config.train.k_train, 0.8)


def test_step_time_over_the_budget_is_recorded_infeasible(tiny_artifacts, tiny_config, tmp_path):
    from dataclasses import replace

    cfg = replace(tiny_config, train=replace(tiny_config.train, time_budget_s_per_epoch=1e-6, budget_probe_steps=1))
    summary = train_drafter(cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "pard", 32,
                            tmp_path / "run", **_quiet())
    assert summary["status"] == "infeasible" and summary["method"] == "pard" and summary["ctx"] == 32
    assert summary["projected_epoch_s"] == pytest.approx(summary["measured_step_s"] * summary["steps_per_epoch"])
    assert summary["projected_epoch_s"] > 1e-6 and summary["completed_steps"] == 2  # 1 warm-up + 1 probe
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert not (tmp_path / "run" / "final").exists()
    # A generous budget lets the same run finish.
    cfg = replace(tiny_config, train=replace(tiny_config.train, time_budget_s_per_epoch=1e6))
    ok = train_drafter(cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "pard", 32,
                       tmp_path / "run", **_quiet())
    assert ok["status"] == "ok" and (tmp_path / "run" / "final").exists()


def test_chunked_head_loss_equals_one_chunk():
    from peagle.losses import head_loss

    g = torch.Generator().manual_seed(0)
    m, h, v = 37, 8, 29
    hid = torch.randn(m, h, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    tgt_h, tgt_w = torch.randn(m, h, dtype=torch.float64, generator=g), torch.randn(v, h, dtype=torch.float64, generator=g)
    for kind in ("kl", "ce"):
        ref, ref_hit = head_loss(hid, w, tgt_h, tgt_w, kind)
        ref_grads = torch.autograd.grad(ref, (hid, w))
        out, hit = head_loss(hid, w, tgt_h, tgt_w, kind, chunk_rows=5)
        grads = torch.autograd.grad(out, (hid, w))
        assert torch.allclose(out, ref, rtol=1e-12) and torch.equal(hit, ref_hit)
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(grads, ref_grads))


def test_unknown_method_is_a_clear_error(tiny_artifacts, tiny_config, tmp_path):
    from peagle.example import TrainingError

    with pytest.raises(TrainingError, match="unknown method 'medusa'"):
        train_drafter(tiny_config, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "medusa", 32,
                      tmp_path / "run", **_quiet())


def test_failed_training_cells_flow_into_table1(tiny_config, tmp_path):
    """An OOM / infeasible run's summary becomes an evaluation record and a table cell."""
    from dataclasses import replace

    from peagle.evaluate import evaluate_drafter
    from peagle.tables import write_table1

    cfg = replace(tiny_config, table1=replace(tiny_config.table1, contexts=[32], paper_contexts=[1024],
                                              methods=["parallelspec", "pard"], eval_set="mt_bench", k=3))
    evals = []
    for method, status in (("parallelspec", "OOM"), ("pard", "infeasible")):
        run = tmp_path / method
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"status": status, "method": method, "ctx": 32,
                                                      "drafter_layers": 1, "budget_mb": 64}))
        res = evaluate_drafter(cfg, "unused.json", run, tmp_path / "eval_mt_bench.jsonl", 3, **_quiet())
        assert res["status"] == status and res["acceptance_length"] is None
        evals.append(tmp_path / f"{method}.json")
        evals[-1].write_text(json.dumps(res))
    df = write_table1(cfg, [str(e) for e in evals], [], tmp_path / "table1.csv")
    assert df.set_index("method")["ctx=32"].to_dict() == {"parallelspec": "OOM", "pard": "infeasible"}
    prov = json.loads((tmp_path / "table1.provenance.json").read_text())
    assert prov["cells"]["parallelspec@ctx=32"]["runs"]["0"]["training"]["budget_mb"] == 64  # train.seeds: [0]


def test_a_run_and_its_evaluation_carry_the_training_seed(tiny_config, tmp_path, capsys):
    """The train stage trains one of train.seeds; the evaluation records the seed, checked against the run's."""
    from peagle.cli import main
    from peagle.evaluate import EvaluationError, evaluate_drafter

    run = tmp_path / "pard_ctx32_s1"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "OOM", "method": "pard", "ctx": 32, "seed": 1,
                                                  "drafter_layers": 4, "budget_mb": 64}))
    prompts = tmp_path / "eval_mt_bench.jsonl"
    assert evaluate_drafter(tiny_config, "unused.json", run, prompts, 3, seed=1, **_quiet())["seed"] == 1
    assert evaluate_drafter(tiny_config, "unused.json", run, prompts, 3, **_quiet())["seed"] == 1
    with pytest.raises(EvaluationError, match="trained with seed 1, but evaluated as seed 2"):
        evaluate_drafter(tiny_config, "unused.json", run, prompts, 3, seed=2, **_quiet())
    # A seed outside the profile's train.seeds ([0]) is refused before anything loads.
    tiny = str(Path(__file__).resolve().parents[1] / "config" / "tiny.yaml")
    assert main(["train", "--config", tiny, "--target", "t.json", "--hidden-dir", "h",
                 "--method", "pard", "--ctx", "32", "--seed", "5", "--out-dir", str(tmp_path / "x")]) == 2
    assert "seed 5 is not one of train.seeds [0]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
