"""Table 2, the memory-scaling sweep and Figs. 3-4 at test sizes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from peagle.bench import memory as membench
from peagle.bench.table2 import window, write_table2
from peagle.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _scaled(cfg, **scaling):
    return dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, **scaling))


def test_window_wraps_around_the_stream():
    stream = {"input_ids": torch.arange(10), "aux_hidden": torch.arange(30).view(10, 3)}
    w = window(stream, 8, 5)
    assert w["input_ids"].tolist() == [8, 9, 0, 1, 2]
    assert torch.equal(w["aux_hidden"][2], stream["aux_hidden"][0])
    assert window(stream, 12, 3)["input_ids"].tolist() == [2, 3, 4]


def test_table2_measures_every_available_path(tiny_artifacts, tiny_config, tmp_path):
    cfg = _scaled(tiny_config, table2_seq_len=64, table2_k=3, table2_examples=5, table2_timed_steps=1)
    out = tmp_path / "table2.csv"
    df = write_table2(cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], out, config_files=["x.yaml"])
    assert out.exists() and pd.read_csv(out).shape == df.shape
    by = df.set_index("mask_strategy")
    assert {"pard", "amortized"} <= set(by.index)
    assert by.loc["amortized", "load_ratio_vs_peagle"] == 1.0 and by.loc["amortized", "epoch_ratio_vs_peagle"] == 1.0
    # (EAGLE-3's load -- a copy of 63 rows x 5 -- rounds to 0.000 s here; checked unrounded below.)
    assert (df.loc[df["mask_strategy"] != "", "load_s_5_examples"] > 0).all()
    assert by.loc["pard", "paper_load_s_128_examples"] == "718.5"
    prov = json.loads((tmp_path / "table2.provenance.json").read_text())
    assert prov["table"] == "table2" and prov["config_files"] == ["x.yaml"]
    assert "NOT a full epoch" in prov["method"]["epoch_time"]
    meas = prov["measurements"]["amortized"]
    assert all(m["epoch_s"] > 0 for m in prov["measurements"].values())
    assert len(meas["fwd_bwd_s"]) == 1 and meas["elements_mean"] > 63
    # Epoch = ceil(training-set tokens / seq_len) examples of seq_len tokens.
    total = prov["data"]["train_tokens"]
    assert prov["setting"]["examples_per_epoch"] == -(-total // 64)

    # EAGLE-3's row: a data path without a mask, measured by default, after the mask paths.
    assert df["method"].iloc[-1] == "eagle3" and prov["paths"][-1] == "eagle3"
    e3 = df.set_index("method").loc["eagle3"]
    assert e3["data_path"] == "EAGLE-3 (training-time test, no mask)" and e3["mask_strategy"] == ""
    assert e3["mask_ms_per_example"] == 0.0 and e3["epoch_s"] > 0
    assert e3["paper_load_s_128_examples"] == "14.8" and e3["paper_epoch_hours_8xH200"] == "2.5"
    m3, ref = prov["measurements"]["eagle3"], prov["measurements"]["amortized"]
    assert e3["load_ratio_vs_peagle"] == round(m3["load_s"] / ref["load_s"], 2)
    assert e3["epoch_ratio_vs_peagle"] == round(m3["epoch_s"] / ref["epoch_s"], 3)
    assert m3["load_s"] > 0 and m3["epoch_s"] > 0 and m3["optimizer_step_s"] > 0 and min(m3["fwd_bwd_s"]) > 0
    assert set(m3["parts_ms_mean"]) == {"gather"} and len(m3["fwd_bwd_s"]) == 1
    setting = prov["setting"]["eagle3"]
    steps = tiny_config.methods["eagle3"].ttt_steps
    assert setting["ttt_steps"] == steps and setting["paper_ttt_steps"] == 7
    assert setting["num_layers"] == 1 and setting["parallel"] is False and setting["embed_trainable"] is False
    assert m3["elements_mean"] == setting["elements_per_example"] == sum(63 - s for s in range(steps))
    assert "not_included" not in prov["method"] and "EAGLE-3" in prov["method"]["data_loading"]
    # The CSV round-trips the empty mask strategy as missing, the rest as written.
    back = pd.read_csv(out).set_index("method")
    assert pd.isna(back.loc["eagle3", "mask_strategy"])
    assert back.loc["eagle3", "load_ratio_vs_peagle"] == e3["load_ratio_vs_peagle"]


def test_table2_rejects_unknown_paths(tiny_artifacts, tiny_config, tmp_path):
    from peagle.bench.table2 import ROWS, run_table2

    assert [r.name for r in ROWS] == ["pard", "amortized", "maskfree", "eagle3"]
    with pytest.raises(ValueError, match="no-such-path"):
        run_table2(tiny_config, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], paths=["no-such-path"])


def test_memory_configurations_measure_shared_cells_once(tiny_config):
    cfg = _scaled(tiny_config, memory_contexts=[64, 128], memory_partitions=[1, 2], memory_partition_ctx=128)
    confs = membench.configurations(cfg, ["amortized", "pard"], with_partitions=True)
    keys = [(c["strategy"], c["ctx"], c["partitions"]) for c in confs]
    assert len(keys) == len(set(keys)) == 6
    assert ("amortized", 128, 2) in keys and ("pard", 64, 1) in keys
    no_s = membench.configurations(cfg, ["amortized"], with_partitions=False)
    assert all(c["partitions"] == 1 for c in no_s)


def test_memory_sweep_records_ok_and_oom_in_subprocesses(tmp_path):
    overlay = {
        "target": {"hidden_size": 64, "num_heads": 2, "num_kv_heads": 2, "vocab_size": 300},
        "drafter": {"num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64},
        "scaling": {"memory_k": 4, "memory_contexts": [32, 1500], "memory_partitions": [1, 2],
                    "memory_partition_ctx": 32, "memory_strategies": ["amortized", "no-such-strategy"],
                    "memory_budget_mb": 48},
    }
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    files = [str(ROOT / "config" / "tiny.yaml"), str(tmp_path / "overlay.yaml")]
    cfg = load_config(*files)
    logs = []
    df = membench.run_sweep(cfg, tmp_path / "mem.csv", config_files=files, figure=str(tmp_path / "mem.png"),
                            timeout_s=120, log=logs.append)
    cells = {(r.ctx, r.partitions): r for r in df.itertuples()}
    assert set(df["strategy"]) == {"amortized"}
    assert any("no-such-strategy" in m for m in logs)
    ok = cells[(32, 1)]
    assert ok.status == "ok" and ok.peak_mb > ok.baseline_mb > 0 and ok.step_s > 0 and ok.steps_run == 2
    assert cells[(1500, 1)].status == "OOM" and cells[(1500, 1)].budget_mb == 48
    assert cells[(32, 2)].status == "ok"
    assert (tmp_path / "mem.png").exists() and (tmp_path / "mem.pdf").exists()
    prov = json.loads((tmp_path / "mem.provenance.json").read_text())
    assert prov["strategies_skipped"] == ["no-such-strategy"] and prov["partitions_available"]


def test_fig3_masks_are_position_invariant():
    from peagle.figures import fig3_masks, mask_classes

    short_lay, short, long_lay, long = fig3_masks(3, 7, 3)
    assert short.shape == (9, 9) and long.shape == (21, 21)
    assert torch.equal(long[:9, :9], short)
    cls = mask_classes(long_lay, long)
    assert set(cls.ravel().tolist()) == {0, 1, 2}


def test_fig4_segments_follow_algorithm_1():
    from peagle.figures import fig4_grid

    grid, layout, seg = fig4_grid(16, 4, partitions=4)
    assert grid.shape == (4, 16)
    # Depth 0: own position; depth >= 1: the depth-1 position a + 1.
    for a, d, s in zip(layout.anchor.tolist(), layout.depth.tolist(), seg.tolist()):
        assert s == ((a if d == 0 else a + 1) * 4) // 16
        assert grid[d, a + d] == s


def test_write_figures(tiny_config, tmp_path):
    from peagle.figures import write_figures

    paths = write_figures(tiny_config, tmp_path)
    assert sorted(p.name for p in paths) == ["fig3_mask.pdf", "fig3_mask.png", "fig4_partition.pdf",
                                             "fig4_partition.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.parametrize("cmd", ["table2", "figures", "memory-scaling"])
def test_cli_has_the_commands(cmd):
    from peagle.cli import build_parser

    with pytest.raises(SystemExit) as err:
        build_parser().parse_args([cmd, "--help"])
    assert err.value.code == 0


def test_target_curve_pretrains_each_step_count_afresh(tmp_path):
    """One row per (steps, set), each from its own pretraining: tokens follow the step count."""
    import pandas as pd

    from peagle.bench.target_curve import run
    from peagle.data.tiny import make_tiny_data
    from peagle.provenance import read_provenance

    root = Path(__file__).resolve().parents[1]
    configs = [str(root / "config" / "tiny.yaml"), str(root / "tests" / "fixtures" / "smoke.yaml")]
    make_tiny_data(tmp_path / "data", seed=0, n_train=60, n_eval=4)
    out = tmp_path / "curve.csv"
    run(configs, tmp_path / "data", [2, 5], out, targets=["tiny-llama"], n_prompts=2)
    df = pd.read_csv(out)
    assert sorted(df["steps"].unique()) == [2, 5]
    assert len(df) == 2 * df["eval_set"].nunique()
    assert (df["tokens_seen"] == df["steps"] * 4 * 64).all()  # smoke pretraining: batch 4 x 64 tokens
    for col in ("repetition_ratio", "cap_rate", "heldout_next_token_accuracy", "copy_accuracy"):
        assert col in df
    assert read_provenance(out)["steps"] == [2, 5]
