"""The training-recipe ablations (Tables 3-8, Figure B): which runs each table needs, shared runs
trained once, rows added without retraining the others, bad rows refused before any job, the
tables and their comparison, and the regularized design's alpha over training."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from peagle.ablations import plan_ablations, unique_runs
from peagle.config import ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "config" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny():
    return load_config(TINY)


def _overlay(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_the_chain_shares_rows_and_reuses_the_main_cells(tiny):
    plans = plan_ablations(tiny, config_from_dict)
    assert list(plans) == ["table3", "table6", "table8", "table5", "table4", "table7"]
    digests = {name: [r.run.digest for r in p.rows] for name, p in plans.items()}
    # Each table's "before" row is the previous table's "after" row: the same run.
    for before, after in (("table6", "table8"), ("table8", "table5"), ("table5", "table4"), ("table4", "table7")):
        assert digests[before][-1] == digests[after][0], (before, after)
    assert len(unique_runs(plans)) == 13  # 5 (Table 3) + 2 + 1 + 1 + 2 + 2
    # Table 3's shared row has the profile's own settings: it is Table 9's P-EAGLE cell on the MoE target.
    shared = plans["table3"].rows[0].run
    assert shared.profile_settings and (shared.target, shared.method, shared.ctx) == ("tiny-moe", "peagle", 256)
    # Every chain row sets the recipe it stands for.
    t7 = {k: v for k, v in plans["table7"].rows[2].run.overrides}
    assert t7 == {"train.k_train": 8, "train.epochs": 3} and plans["table7"].rows[2].run.ctx == 512


def test_a_run_is_addressed_by_its_settings_not_their_spelling(tiny, tmp_path):
    """Spelling out the profile's own value (drafter.num_layers: 4) changes no digest; the digest
    does not move with settings that do not shape training (evaluation, Table 1)."""
    base = {r.run.digest for p in plan_ablations(tiny, config_from_dict).values() for r in p.rows}
    spelt = load_config(TINY, _overlay(tmp_path, {"ablations": {"recipe": {"base": {"drafter.intermediate_size": 768}},
                                                               "hidden": {"base": {"train.retention": 0.8}}},
                                                 "eval": {"n_prompts": 7}, "table9": {"eval_sets": ["gsm8k"]}}))
    assert {r.run.digest for p in plan_ablations(spelt, config_from_dict).values() for r in p.rows} == base
    assert spelt.digest() != tiny.digest()  # ... while the profile's digest did move


def test_an_overlay_adds_a_row_and_retrains_nothing_else(tiny, tmp_path):
    more = load_config(TINY, _overlay(tmp_path, {"ablations": {"recipe": {"tables": {"table4": {
        "rows": [1, 2, 4, 8], "then": 4}}}}}))
    before, after = plan_ablations(tiny, config_from_dict), plan_ablations(more, config_from_dict)
    assert [r.label for r in after["table4"].rows][-1] == "drafter.num_layers=8"
    new = {r.run.digest for p in after.values() for r in p.rows} - {r.run.digest for p in before.values() for r in p.rows}
    assert len(new) == 1  # only the 8-layer run
    assert more.digest() == tiny.digest()  # Tables 1 and 9 stay current: ablations carry their own digest


def test_a_table_with_a_new_row_is_stale_and_the_others_current(tiny, tmp_path):
    """The recorded ablations judged under an overlay that adds an 8-layer row: Table 4 is stale (its
    rows changed), Table 7 and the others stay current (the config digest did not move)."""
    from peagle.cli import ablation_digests
    from peagle.compare import compare_tables

    more = load_config(TINY, _overlay(tmp_path, {"ablations": {"recipe": {"tables": {"table4": {
        "rows": [1, 2, 4, 8], "then": 4}}}}}))
    recorded = ROOT / "results" / "recorded" / "tiny" / "ablations"
    out = compare_tables(recorded, current_digest=more.digest(), ablation_digests=ablation_digests(more),
                         only=["table4", "table7"])
    provenance = {t: out[out.index(f"## {t}: "):].splitlines()[2] for t in ("table4", "table7")}
    assert "ablation digest" in provenance["table4"] and provenance["table4"].endswith("regenerate it)")
    assert provenance["table7"].endswith("-> current."), provenance["table7"]


@pytest.mark.parametrize("body, match", [
    ({"ablations": {"recipe": {"tables": {"table4": {"setting": "drafter.layers"}}}}},
     r"ablations\.recipe\.tables\.table4\.setting.*not a training setting"),
    ({"ablations": {"hidden": {"target": "tiny-gpt"}}}, r"ablations\.hidden\.target: unknown target 'tiny-gpt'"),
    ({"ablations": {"recipe": {"method": "medusa"}}}, r"ablations\.recipe\.method: unknown method 'medusa'"),
])
def test_a_malformed_ablation_fails_when_the_config_loads(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(TINY, _overlay(tmp_path, body))
    assert "overlay.yaml" in str(err.value)  # the file that sets it


@pytest.mark.parametrize("body, match", [
    ({"ablations": {"hidden": {"tables": {"table3": {"rows": ["shared", "learned_positions"], "paper": []}}}}},
     r"ablations\.hidden\.tables\.table3\.rows\[1\].*'learned_positions' is not one of"),
    ({"ablations": {"recipe": {"tables": {"table4": {"rows": [0, 2, 4]}}}}},
     r"table4\.rows\[0\] \(drafter\.num_layers=0\).*must be >= 1"),
    ({"ablations": {"recipe": {"k": 7}}}, r"ablations\.recipe\.k: K_infer=7 exceeds the 5 depths.*train\.k_train"),
])
def test_a_row_that_cannot_train_fails_before_any_job(tmp_path, body, match):
    """Rows are built into training configs where the ablations are used; the DAG refuses them at
    planning time. Shrinking train.k_train for Table 1 alone is not refused for the ablations."""
    from peagle.ablations import AblationError

    cfg = load_config(TINY, _overlay(tmp_path, body))
    with pytest.raises(AblationError, match=match):
        plan_ablations(cfg, config_from_dict)
    load_config(TINY, _overlay(tmp_path, {"train": {"k_train": 3}}))  # loads: Table 1 runs at K <= 3


def test_the_dag_refuses_a_bad_row_before_any_job(tmp_path):
    from test_workflow import snakemake

    overlay = _overlay(tmp_path, {"ablations": {"recipe": {"tables": {"table4": {"rows": [0, 2, 4]}}}}})
    proc = snakemake("paper_tables/table4.csv", "--configfile", str(overlay))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "table4.rows[0] (drafter.num_layers=0)" in out and "overlay.yaml" in out
    assert snakemake("paper_tables/table1.csv", "--configfile", str(overlay)).returncode == 0  # other tables plan


def test_the_workflow_trains_only_what_one_table_needs():
    """`snakemake paper_tables/table4.csv` plans Table 4's three runs and their evaluations, nothing else."""
    from test_workflow import _count, plan

    jobs = plan("paper_tables/table4.csv")
    assert _count(jobs, "train_ablation") == 3 and _count(jobs, "evaluate_ablation") == 6
    assert _count(jobs, "train") == 0 and _count(jobs, "ablation_table") == 1
    jobs = plan("paper_tables/table3.csv")  # the shared row is the main DAG's Table 9 cell
    assert _count(jobs, "train_ablation") == 4 and _count(jobs, "train") == 1


def _eval(path: Path, eval_set: str, al: float, seed: int = 0) -> str:
    path.write_text(json.dumps({"status": "ok", "eval_set": eval_set, "k": 5, "acceptance_length": al, "seed": seed,
                                "method": "peagle", "target_name": "tiny-llama"}))
    return str(path)


def test_ablation_table_and_comparison(tiny, tmp_path):
    from peagle.compare import compare_ablation
    from peagle.provenance import read_provenance
    from peagle.tables import TableError, write_ablation_table

    cfg = dataclasses.replace(tiny, train=dataclasses.replace(tiny.train, seeds=[0, 1]))
    plan = plan_ablations(cfg, config_from_dict)["table4"]
    als = {"drafter.num_layers=1": (2.0, 2.1), "drafter.num_layers=2": (2.5, 2.45), "drafter.num_layers=4": (2.4, 2.6)}
    evals = [_eval(tmp_path / f"{i}_{s}_{seed}.json", s, als[row.label][seed] + (s == "mt_bench") * 0.1, seed)
             for i, row in enumerate(plan.rows) for s in plan.eval_sets for seed in (0, 1)]
    df = write_ablation_table(cfg, "table4", evals, tmp_path / "table4.csv")
    assert list(df["row"]) == [r.label for r in plan.rows] and list(df["n_seeds"]) == [2, 2, 2]
    assert df.loc[0, "humaneval"] == 2.05 and df.loc[2, "humaneval_paper"] == 3.92 and df.loc[0, "mt_bench_paper"] == 2.41
    prov = read_provenance(tmp_path / "table4.csv")
    assert prov["ablation_group"] == "recipe" and prov["scale"] and prov["shared_settings"]["train.k_train"] == 8
    text = "\n".join(compare_ablation("table4", df, prov))
    assert "Claim (4)" in text and "humaneval: ours rises overall" not in text and "the paper rises" in text
    # 2 -> 4 layers is a tie within the spread (2.475 +- 0.035 vs 2.5 +- 0.141): no fall, so ours rises
    assert "humaneval: ours rises" in text
    with pytest.raises(TableError, match="evaluation files for 3 rows x 2 sets x 2 seeds"):
        write_ablation_table(cfg, "table4", evals[:-1], tmp_path / "x.csv")
    with pytest.raises(TableError, match="a result for mt_bench at K=5, expected humaneval"):
        write_ablation_table(cfg, "table4", evals[2:] + evals[:2], tmp_path / "x.csv")


def test_the_regularized_design_learns_alpha_and_figure_b_plots_it(tiny_artifacts, tiny_config, tmp_path):
    from peagle.figures import plot_fig_alpha
    from peagle.train import train_drafter

    cfg = dataclasses.replace(tiny_config, drafter=dataclasses.replace(tiny_config.drafter,
                                                                       hidden_variant="regularized_ntp"),
                              train=dataclasses.replace(tiny_config.train, epochs=1, grad_accum=2))
    assert train_drafter(cfg, tiny_artifacts["target_json"], tiny_artifacts["hidden_dir"], "peagle", 64,
                         tmp_path / "run", progress=False, log=lambda m: None)["status"] == "ok"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    alphas = [m["ntp_alpha"] for m in metrics]
    assert len(alphas) >= 3 and alphas[-1] != pytest.approx(0.1, abs=1e-6)  # alpha trains
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["peagle"]["spec"]["hidden_variant"] == "regularized_ntp"
    paths = plot_fig_alpha([tmp_path / "run"], tmp_path / "figB", paper_final=0.029)
    assert all(p.stat().st_size > 0 for p in paths)
    assert len(Path(paths[-1]).read_text().splitlines()) == 1 + 1 + len(alphas)  # header, step 0, every step
    from peagle.checkpoint import CheckpointError, check_export

    with pytest.raises(CheckpointError, match="hidden_variant is 'regularized_ntp'.*suite's engine only"):
        check_export(tmp_path / "run" / "final")


def test_the_recorded_ablations_are_current_and_compared():
    """`peagle compare` shows the recorded ablations (results/recorded/tiny/ablations/) beside the
    paper, current for the config files that made them: a change that moves their digest fails here."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "peagle", "compare"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    for table in ("table3", "table4", "table5", "table6", "table7", "table8"):
        section = out[out.index(f"## {table}: "):]
        assert section.splitlines()[2].endswith("-> current."), section.splitlines()[2]
    assert "Claim (3)" in out and "table3.csv not found" not in out
