"""``peagle compare-drafter``: a drafter from outside the DAG beside hand-written recorded baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peagle import drafter_compare as dc
from peagle.checkpoint import CheckpointError, save_drafter
from peagle.data.schema import PromptRecord, write_prompts
from peagle.drafters import DrafterSpec, build_drafter
from peagle.evaluate import EvaluationError
from peagle.speculators import save_speculators

ROOT = Path(__file__).resolve().parents[1]
SETS = ("mt_bench", "humaneval", "gsm8k")


def _raw_config():
    from peagle.config import read_config_files

    raw = read_config_files(ROOT / "config" / "tiny.yaml")
    raw["runtime"]["threads"] = 1
    raw["drafter"].update(num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=96)
    raw["train"].update(k_train=3, epochs=1, grad_accum=4, max_mask_len=128, lr=3e-3, memory_budget_mb=None,
                        time_budget_s_per_epoch=None)
    raw["methods"]["peagle"] = {"partitions": 1}
    raw["eval"].update(k=3, max_new_tokens=8, n_prompts=2, lossless_check_prompts=1)
    raw["table9"].update(k=3)
    raw["drafting_cost"].update(ks=[2, 3, 4], n_prompts=2, max_new_tokens=8)
    raw["vllm"]["python"] = "/nonexistent/vllm/python"
    return raw


@pytest.fixture(scope="module")
def setup(tiny_artifacts, tmp_path_factory):
    """Config file, eval data, and a P-EAGLE drafter trained here with its own config (2 layers, k_train 3)."""
    import yaml

    from peagle.config import load_config
    from peagle.train import train_drafter

    root = tmp_path_factory.mktemp("cmp")
    cfg_file = root / "profile.yaml"
    cfg_file.write_text(yaml.safe_dump(_raw_config()))
    cfg = load_config(cfg_file)
    data = root / "data"
    for s in SETS:
        write_prompts(data / f"eval_{s}.jsonl",
                      [PromptRecord(f"{s}{i}", "test", s, (f"def f{i}(x):",)) for i in range(3)])
    train_drafter(cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "peagle", 32, root / "run",
                  progress=False, log=lambda m: None)
    info = json.loads(Path(tiny_artifacts["target_json"]).read_text())
    return {"cfg": cfg, "cfg_file": cfg_file, "data": data, "run": root / "run", "drafter": root / "run" / "final",
            "info": info, "target": tiny_artifacts["target_json"],
            "name": dc.target_name(info, tiny_artifacts["target_json"])}


def _recorded(root: Path, target: str, digest: str) -> Path:
    """A recorded-baselines dir as `peagle record` writes it (manifest, table9 + provenance, drafting cost)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({"profile": "tiny", "commit": "abc1234", "config_digest": digest}))
    rows = ["target,architecture,eval_set,k,eagle3_layers,eagle3,peagle_layers,peagle,rel_diff_pct"]
    cells = {}
    for i, s in enumerate(SETS):
        rows.append(f"{target},llama,{s},3,1,{1.5 + i / 10},4,{1.8 + i / 10},20.0")
        for m, al, layers in (("eagle3", 1.5 + i / 10, 1), ("peagle", 1.8 + i / 10, 4)):
            cells[f"{target}/{s}/{m}"] = {"status": "ok", "acceptance_length": al,
                                          "per_position_acceptance": [0.4, 0.2, 0.1], "rounds": 10, "new_tokens": 20,
                                          "draft_s": 0.05, "verify_s": 0.1, "prompts": 2, "drafter_layers": layers}
    (root / "table9.csv").write_text("\n".join(rows) + "\n")
    (root / "table9.provenance.json").write_text(json.dumps({"config_digest": digest, "commit": "abc1234",
                                                             "cells": cells}))
    cols = ("target_name,method,drafter_layers,k,prompts,rounds,draft_ms_per_round,verify_ms_per_round,"
            "acceptance_length,new_tokens,wall_s,output_tokens_per_s,eval_set,k_train,drafter")
    lines = [cols] + [f"{target},{m},{layers},{k},2,10,{ms * k},3.0,{al + k / 10},20,1.0,20.0,mt_bench,{kt},d/{m}"
                      for m, layers, ms, al, kt in (("eagle3", 1, 1.0, 1.4, ""), ("peagle", 4, 2.0, 1.7, 5))
                      for k in (2, 3, 4)]
    (root / "drafting_cost.csv").write_text("\n".join(lines) + "\n")
    (root / "drafting_cost.provenance.json").write_text(json.dumps({"config_digest": digest, "commit": "abc1234"}))
    return root


def test_outside_drafter_is_compared_and_reported(setup, tmp_path):
    from peagle.cli import main

    rec = _recorded(tmp_path / "recorded", setup["name"], setup["cfg"].digest())
    out = tmp_path / "compare" / "mine.md"
    rc = main(["compare-drafter", "--config", str(setup["cfg_file"]), "--drafter", str(setup["run"]),
               "--target", str(setup["target"]), "--data-dir", str(setup["data"]), "--recorded", str(rec),
               "--out", str(out), "--name", "mine", "--no-progress"])
    assert rc == 0
    text = out.read_text()
    assert "# Compare drafter: mine" in text and "peagle format" in text and "trained K (k_train): 3" in text
    assert "abc1234" in text and setup["cfg"].digest() in text and "STALE" not in text
    for s in SETS:
        assert f"### {s}" in text
    assert "recorded EAGLE-3" in text and "gpt-oss-120b: EAGLE-3 2.7, P-EAGLE 2.9" in text
    assert "K=[4] of drafting_cost.ks skipped" in text and "vLLM check not run" in text
    import pandas as pd

    df = pd.read_csv(out.with_suffix(".csv"))
    mine = df[(df["section"] == "table9") & (df["source"] == "mine")]
    assert sorted(mine["eval_set"]) == sorted(SETS) and (mine["k"] == 3).all() and (mine["drafter_layers"] == 2).all()
    assert ((mine["acceptance_length"] >= 1) & (mine["acceptance_length"] <= 4)).all()
    assert all(len(json.loads(p)) == 3 for p in mine["per_position_acceptance"])
    rec9 = df[(df["section"] == "table9") & (df["source"] == "recorded peagle")].set_index("eval_set")
    assert rec9.loc["humaneval", "acceptance_length"] == pytest.approx(1.9)
    assert rec9.loc["humaneval", "draft_ms_per_round"] == pytest.approx(5.0)
    sweep = df[df["section"] == "k_sweep"]
    assert sorted(sweep[sweep["source"] == "mine"]["k"]) == [2, 3]  # K=4 > k_train skipped
    assert sorted(sweep[sweep["source"] == "recorded eagle3"]["k"]) == [2, 3, 4]
    prov = json.loads(out.with_suffix(".provenance.json").read_text())
    assert prov["config_digest"] == setup["cfg"].digest() and prov["drafter"]["k_train"] == 3
    png = out.with_name("mine_al_vs_k.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "mine_al_vs_k.png" in text
    assert not list(out.parent.glob(".*.tmp"))


def test_speculators_drafter_with_stale_and_missing_baselines(setup, tmp_path):
    from peagle.checkpoint import load_drafter

    model, _ = load_drafter(setup["drafter"])
    spec_dir = save_speculators(model, tmp_path / "specdrafter", verifier="tiny", k_train=3)
    stale = _recorded(tmp_path / "stale", setup["name"], "0123456789abcdef")
    res = dc.compare_drafter(setup["cfg"], spec_dir, setup["target"], setup["data"], stale, tmp_path / "s.md",
                             progress=False, log=lambda m: None)
    text = (tmp_path / "s.md").read_text()
    assert "speculators format" in text and "**STALE**" in text and "0123456789abcdef" in text
    assert res["name"] == "specdrafter" and set(res["results"]["table9"]) == set(SETS)
    # The same weights in the suite's format give the same acceptance (the engine is deterministic).
    ours = dc.compare_drafter(setup["cfg"], setup["drafter"], setup["target"], setup["data"], tmp_path / "none",
                              tmp_path / "m.md", progress=False, log=lambda m: None)
    for s in SETS:
        assert ours["results"]["table9"][s]["acceptance_length"] == res["results"]["table9"][s]["acceptance_length"]
    text = (tmp_path / "m.md").read_text()
    assert "no recorded baselines" in text and "missing" in text
    assert (tmp_path / "m.csv").exists() and (tmp_path / "m_al_vs_k.png").exists()


def _spec_for(info, **kw):
    base = {"hidden_size": info["hidden_size"], "vocab_size": info["vocab_size"], "num_layers": 1, "num_heads": 2,
            "num_kv_heads": 2, "head_dim": 32, "intermediate_size": 96, "mask_token_id": info["mask_token_id"],
            "aux_layer_ids": info["aux_layer_ids"], "max_position_embeddings": 256}
    return DrafterSpec(**{**base, **kw})


def _no_models(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the pre-flight failed")

    monkeypatch.setattr(dc, "evaluate_all", boom)
    monkeypatch.setattr("peagle.target.load_target", boom)


def test_bad_inputs_fail_before_any_model_loads(setup, tmp_path, monkeypatch):
    _no_models(monkeypatch)
    info, cfg = setup["info"], setup["cfg"]
    run = lambda d, **kw: dc.compare_drafter(cfg, d, setup["target"], setup["data"], tmp_path / "rec",
                                             tmp_path / "o.md", progress=False, log=lambda m: None, **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a drafter checkpoint.*peagle.spec.*speculators_model_type") as e:
        run(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)
    cases = {
        "hidden": (_spec_for(info, hidden_size=32, head_dim=16), "hidden_size=32 != the target's hidden_size=64"),
        "aux": (_spec_for(info, aux_layer_ids=[0, 1, 2]),
                "eagle_aux_hidden_state_layer_ids=[0, 1, 2] != the target's aux_layer_ids=[1, 2, 3]"),
        "vocab": (_spec_for(info, vocab_size=50, mask_token_id=5), "vocab_size=50 != the target's"),
    }
    for name, (spec, msg) in cases.items():
        d = save_drafter(tmp_path / name, build_drafter(spec), {"method": "peagle", "k_train": 3})
        with pytest.raises(EvaluationError) as e:
            run(d)
        assert str(e.value).startswith(f"{d / 'config.json'}: ") and msg in str(e.value), str(e.value)
        if name == "hidden":  # the same check on the speculators format names its own field
            s = save_speculators(build_drafter(spec), tmp_path / "spec_hidden", verifier="t", k_train=3)
            with pytest.raises(EvaluationError, match=r"transformer_layer_config\.hidden_size=32"):
                run(s)
    ok = save_drafter(tmp_path / "ok", build_drafter(_spec_for(info)), {"method": "peagle", "k_train": 3})
    with pytest.raises(EvaluationError, match=r"K=5 exceeds the 3 depths .*\(peagle\.k_train\)") as e:
        run(ok, k=5)
    assert str(ok / "config.json") in str(e.value)
    s = save_speculators(build_drafter(_spec_for(info)), tmp_path / "spec_ok", verifier="t", k_train=2)
    with pytest.raises(EvaluationError, match=r"speculators_config\.proposal_methods\[0\]\.speculative_tokens"):
        run(s)  # table9.k = 3 > 2
    raw = json.loads((s / "config.json").read_text())
    del raw["speculators_config"]["verifier"]
    (s / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json: speculators config has no "
                                              r"speculators_config\.verifier\.name_or_path"):
        run(s)
    e3 = save_drafter(tmp_path / "e3", build_drafter(_spec_for(info, parallel=False)), {"method": "eagle3"})
    assert dc.preflight(e3, setup["target"], [9])["k_train"] is None  # autoregressive: any K


def test_flipped_weight_byte_fails_the_preflight(setup, tmp_path, monkeypatch):
    import shutil

    _no_models(monkeypatch)
    d = tmp_path / "copy"
    shutil.copytree(setup["drafter"], d)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 0x10
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or were changed after export"):
        dc.compare_drafter(setup["cfg"], d, setup["target"], setup["data"], tmp_path, tmp_path / "o.md",
                           progress=False, log=lambda m: None)


def test_vllm_check_runs_vllm_eval_in_the_vllm_env(setup, tmp_path, monkeypatch):
    """The optional vLLM path: `peagle vllm-eval` with vllm.python and the repo on PYTHONPATH (not run here)."""
    import subprocess

    seen = {}

    def fake_run(cmd, env, **kw):
        seen["cmd"], seen["env"] = cmd, env
        out = Path(cmd[cmd.index("--out") + 1])
        assert json.loads(Path(cmd[cmd.index("--engine-result") + 1]).read_text())["k"] == 3
        out.write_text(json.dumps({"acceptance_length": 1.25}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(dc.subprocess, "run", fake_run)
    res = dc._vllm_eval(setup["cfg"], ["c.yaml"], Path("t.json"), Path("d"), Path("p.jsonl"), 3, {"k": 3},
                        log=lambda m: None)
    assert res == {"acceptance_length": 1.25}
    assert seen["cmd"][:4] == ["/nonexistent/vllm/python", "-m", "peagle", "vllm-eval"]
    assert seen["cmd"][4:6] == ["--config", "c.yaml"] and seen["env"]["PYTHONPATH"] == str(ROOT)
    assert not dc.vllm_available(setup["cfg"])


def test_recorded_baselines_of_several_seeds_are_the_first_seeds(tmp_path):
    """A recorded Table 9 with one run per seed: the baselines are the first seed's runs (as the drafting
    cost sweep's drafters); a recorded table from before seeds is read as it was."""
    from peagle.config import config_from_dict

    cfg = config_from_dict(_raw_config())
    (tmp_path / "manifest.json").write_text(json.dumps({"config_digest": cfg.digest()}))
    (tmp_path / "table9.csv").write_text("target,eval_set\n")
    run = lambda al: {"status": "ok", "acceptance_length": al, "rounds": 10, "draft_s": 0.02, "drafter_layers": 4}
    cells = {"tiny-llama/mt_bench/peagle": {"mean": 2.0, "std": 0.1, "n_seeds": 2, "seeds": [5, 1],
                                            "runs": {"5": run(2.1), "1": run(1.9)}},
             "tiny-llama/mt_bench/eagle3": run(3.0)}  # the format before seeds: the cell is the run
    (tmp_path / "table9.provenance.json").write_text(json.dumps({
        "config_digest": cfg.digest(), "seed_spread": {"seeds": [5, 1], "n_seeds": 2}, "cells": cells}))
    rec = dc.read_recorded(tmp_path, cfg, "tiny-llama")
    assert rec["table9"][("mt_bench", "peagle")]["acceptance_length"] == 2.1
    assert rec["table9"][("mt_bench", "peagle")]["draft_ms_per_round"] == pytest.approx(2.0)
    assert rec["table9"][("mt_bench", "eagle3")]["acceptance_length"] == 3.0
    assert any("2 seeds per cell" in n and "first seed's runs" in n for n in rec["notes"]), rec["notes"]
    assert not rec["stale"]
