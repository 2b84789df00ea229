"""Drafting/verification time per round vs K with the engine, on the tiny test target."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from peagle.bench.drafting_cost import COLUMNS, write_drafting_cost
from peagle.checkpoint import save_drafter
from peagle.data.schema import PromptRecord, write_prompts
from peagle.drafters import DrafterSpec, build_drafter


def _drafter(root, info, method, layers, parallel):
    spec = DrafterSpec(hidden_size=info["hidden_size"], vocab_size=info["vocab_size"], num_layers=layers,
                       num_heads=2, num_kv_heads=2, head_dim=32, intermediate_size=96,
                       mask_token_id=info["mask_token_id"], aux_layer_ids=info["aux_layer_ids"],
                       max_position_embeddings=256, parallel=parallel)
    return save_drafter(root / method, build_drafter(spec, seed=1),
                        {"method": method, "ctx": 64, "k_train": 3 if parallel else None})


@pytest.fixture
def cfg(tiny_config):
    # One thread: these timings are tiny, and spinning OpenMP workers only slow a loaded CI machine.
    return dataclasses.replace(tiny_config, runtime=dataclasses.replace(tiny_config.runtime, threads=1))


@pytest.fixture(scope="module")
def drafters(tiny_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    info = json.loads(tiny_artifacts["target_json"].read_text())
    return [_drafter(root, info, "eagle3", 1, False), _drafter(root, info, "peagle", 2, True)]


def test_drafting_cost_rows_and_files(tiny_artifacts, cfg, drafters, tmp_path):
    prompts = tmp_path / "eval_mt_bench.jsonl"
    write_prompts(prompts, [PromptRecord(f"p{i}", "test", "mt_bench", (f"def f{i}(x):",)) for i in range(3)])
    out = tmp_path / "tables" / "drafting_cost.csv"
    logs = []
    df = write_drafting_cost(cfg, tiny_artifacts["target_json"], drafters, prompts, [2, 4], n_prompts=2,
                             max_new_tokens=6, out=out, config_files=["c.yaml"], progress=False,
                             log=logs.append)
    assert list(df.columns) == COLUMNS
    assert list(zip(df["method"], df["k"])) == [("eagle3", 2), ("eagle3", 4), ("peagle", 2), ("peagle", 4)]
    assert df["drafter_layers"].tolist() == [1, 1, 2, 2]
    assert (df["prompts"] == 2).all() and (df["rounds"] > 0).all() and (df["eval_set"] == "mt_bench").all()
    assert ((df["acceptance_length"] >= 1) & (df["acceptance_length"] <= df["k"] + 1)).all()
    assert (df["new_tokens"] > 0).all() and (df["new_tokens"] <= 12).all()
    assert (df["draft_ms_per_round"] > 0).all() and (df["verify_ms_per_round"] > 0).all()
    assert (df["wall_s"] > 0).all() and (df["output_tokens_per_s"] > 0).all()
    # P-EAGLE trained for K<=3 is timed at K=4 anyway, with a note.
    assert df.loc[df["method"] == "peagle", "k_train"].tolist() == [3, 3]
    assert any("trained for K<=3" in m for m in logs)
    back = pd.read_csv(out)
    assert back.shape == df.shape and back["method"].tolist() == df["method"].tolist()
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert prov["table"] == "drafting_cost" and prov["config_files"] == ["c.yaml"]
    assert prov["runtime"]["device"] == "cpu" and prov["runtime"]["torch_threads"] == 1 and "commit" in prov
    assert prov["setting"]["ks"] == [2, 4] and prov["setting"]["concurrency"] == 1


def test_drafting_cost_skips_untrained_runs(tiny_artifacts, cfg, drafters, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"status": "OOM", "method": "pard"}))
    prompts = tmp_path / "eval_gsm8k.jsonl"
    write_prompts(prompts, [PromptRecord("p0", "test", "gsm8k", ("x = 1",))])
    df = write_drafting_cost(cfg, tiny_artifacts["target_json"], [run, drafters[1]], prompts, [1],
                             n_prompts=5, max_new_tokens=4, out=tmp_path / "dc.csv", progress=False,
                             log=lambda m: None)
    assert df["method"].tolist() == ["peagle"] and df["prompts"].tolist() == [1]
    prov = json.loads((tmp_path / "dc.provenance.json").read_text())
    assert prov["drafters_skipped"] == {str(run): "OOM"}


def test_cli_drafting_cost(tiny_artifacts, drafters, tmp_path, capsys):
    from pathlib import Path

    from peagle.cli import main

    root = Path(__file__).resolve().parents[1]
    prompts = tmp_path / "eval_humaneval.jsonl"
    write_prompts(prompts, [PromptRecord("p0", "test", "humaneval", ("def g(y):",))])
    out = tmp_path / "dc.csv"
    rc = main(["drafting-cost", "--config", str(root / "config" / "tiny.yaml"), "--target",
               str(tiny_artifacts["target_json"]), "--drafters", str(drafters[0]), "--prompts", str(prompts),
               "--ks", "3", "--n-prompts", "1", "--max-new-tokens", "6", "--out", str(out), "--no-progress"])
    assert rc == 0 and pd.read_csv(out)["k"].tolist() == [3]
