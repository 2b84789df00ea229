"""Drafter training: checkpoints round-trip, a killed run resumes to the same weights, loss falls."""

import json

import pytest
import torch

from peagle import checkpoint as ckpt
from peagle.cod import full_grid
from peagle.drafters import DrafterSpec, build_drafter
from peagle.train import _Killed, build_example, distill_loss, train_drafter


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


def test_context_beyond_the_precomputed_mask_is_a_clear_error(tiny_artifacts, tiny_config, tmp_path):
    from dataclasses import replace

    from peagle.train import TrainingError

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
