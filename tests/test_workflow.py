"""The Snakemake workflow plans (dry runs) for both profiles, passes the right config files to
the CLI, refuses bad configs at parse time, and lints clean.

Every run here is a dry run (`-n`) in the repository root with `--forceall`, so the plan does not
depend on what results/ already holds; a dry run starts no job and needs no network. The
end-to-end smoke run of the DAG at minimal sizes is the placeholder at the bottom.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peagle.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake") if (BIN / "snakemake").exists() else shutil.which("snakemake")
TABLE1_RULES = {"data", "target", "respond", "gather_responses", "extract", "train", "evaluate", "table1"}
RULES = TABLE1_RULES | {"table9", "drafting_cost_target", "drafting_cost", "compare", "fig1", "figures",
                       "target_quality", "all"}
GPU_RULES = {"respond", "extract", "train", "evaluate"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(SNAKEMAKE is None, reason="snakemake is not installed"),
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def snakemake(*args: str, dry_run: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake in the repository root; targets must come before --configfile (nargs='+')."""
    cmd = [SNAKEMAKE, *args]
    if dry_run:
        cmd += ["--dry-run", "--forceall"]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def plan(*args: str) -> list[dict]:
    """The jobs of a dry run: [{'rule', 'shell', 'resources', 'threads', 'log', 'wildcards'}]."""
    proc = snakemake(*args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    jobs: list[dict] = []
    for line in out.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            jobs.append({"rule": m.group(1)})
            continue
        if not jobs:
            continue
        m = re.match(r"^    (output|log|resources|threads|wildcards): (.*)$", line)
        if m:
            jobs[-1][m.group(1)] = m.group(2)
        elif line.startswith("Shell command: "):
            jobs[-1]["shell"] = line[len("Shell command: "):]
    assert jobs, out
    return jobs


def _count(jobs: list[dict], rule: str) -> int:
    return sum(j["rule"] == rule for j in jobs)


def _configs(shell: str) -> list[str]:
    return re.findall(r"--config (\S+)", shell)


# --------------------------------------------------------------------------- dry runs


@pytest.fixture(scope="module")
def tiny_plan():
    return plan("paper_tables/table1.csv")


@pytest.fixture(scope="module")
def paper_plan():
    return plan("paper_tables/table1.csv", "--configfile", "config/paper.yaml")


def test_tiny_dry_run(tiny_plan):
    cfg = load_config(ROOT / "config" / "tiny.yaml")
    assert {j["rule"] for j in tiny_plan} == TABLE1_RULES  # the explicit target, not `all`
    cells = len(cfg.table1.methods) * len(cfg.table1.contexts)
    assert _count(tiny_plan, "train") == cells
    assert _count(tiny_plan, "evaluate") == cells
    for rule in ("data", "target", "respond", "gather_responses", "extract", "table1"):
        assert _count(tiny_plan, rule) == 1
    trained = sorted(int(re.search(r"--ctx (\d+)", j["shell"]).group(1)) for j in tiny_plan if j["rule"] == "train")
    assert trained == sorted(cfg.table1.contexts * len(cfg.table1.methods))
    for job in tiny_plan:
        assert job["shell"].startswith(f"python -m peagle {job['rule'].replace('_', '-')} "), job
        assert _configs(job["shell"]) == ["config/tiny.yaml"], job["shell"]
        assert job["log"].startswith("results/tiny/logs/"), job
        assert "gpu" not in job.get("resources", ""), job  # CPU profile: no GPU requests
        if job["rule"] in {"target"} | GPU_RULES:
            assert job["threads"] == str(min(cfg.runtime.threads, os.cpu_count() or 1)), job
    table = next(j for j in tiny_plan if j["rule"] == "table1")
    assert "paper_tables/table1.csv" in table["output"] and "table1.provenance.json" in table["output"]
    assert table["shell"].count("results/tiny/benchmarks/train/") == cells
    assert table["shell"].count("results/tiny/benchmarks/evaluate/") == cells


def test_default_target_is_every_table():
    cfg = load_config(ROOT / "config" / "tiny.yaml")
    jobs = plan()
    assert {j["rule"] for j in jobs} == RULES
    assert _count(jobs, "target") == _count(jobs, "extract") == len(cfg.targets) == 2
    # Table 1's cells plus Table 9's (P-EAGLE at table9.ctx on the Table 1 target is shared).
    t1 = {(cfg.table1_target, m, c) for m in cfg.table1.methods for c in cfg.table1.contexts}
    t9 = {(t, m, cfg.table9.ctx) for t in cfg.table9_targets for m in cfg.table9.methods}
    trained = {(re.search(r"drafters/([^/]+)/", j["shell"]).group(1), re.search(r"--method (\w+)", j["shell"]).group(1),
                int(re.search(r"--ctx (\d+)", j["shell"]).group(1))) for j in jobs if j["rule"] == "train"}
    assert trained == t1 | t9 and _count(jobs, "train") == len(t1 | t9)
    moe = next(j for j in jobs if j["rule"] == "target" and "--name tiny-moe" in j["shell"])
    assert "results/tiny/targets/tiny-moe" in moe["shell"]
    cost = [j for j in jobs if j["rule"] == "drafting_cost_target"]
    assert len(cost) == len(cfg.table9_targets) and all("--drafters " in j["shell"] for j in cost)


def test_paper_dry_run(paper_plan, tiny_plan):
    cfg = load_config(ROOT / "config" / "paper.yaml")
    assert {j["rule"] for j in paper_plan} == {j["rule"] for j in tiny_plan}
    # Table 1 runs on GPT-OSS 120B, as in the paper: the only target it needs.
    (target,) = [j for j in paper_plan if j["rule"] == "target"]
    assert "--name gpt-oss-120b" in target["shell"]
    assert _count(paper_plan, "train") == len(cfg.table1.methods) * len(cfg.table1.contexts)
    for job in paper_plan:
        # paper.yaml is a complete profile: tiny.yaml must not be merged under it.
        assert _configs(job["shell"]) == ["config/paper.yaml"], job["shell"]
        assert job["log"].startswith("results/paper/logs/"), job
        assert "results/tiny" not in job["shell"], job["shell"]
        if job["rule"] in GPU_RULES:
            assert re.search(r"\bgpu=1\b", job["resources"]), job
        else:
            assert "gpu" not in job.get("resources", ""), job


@pytest.mark.parametrize(
    "configfiles, expected",
    [
        (["tests/fixtures/smoke.yaml"], ["config/tiny.yaml", "tests/fixtures/smoke.yaml"]),
        (["config/paper.yaml", "tests/fixtures/smoke.yaml"], ["config/paper.yaml", "tests/fixtures/smoke.yaml"]),
        (["config/tiny.yaml"], ["config/tiny.yaml"]),
    ],
)
def test_config_files_reach_the_cli_in_merge_order(configfiles, expected):
    jobs = plan("table1", "--configfile", *configfiles)  # the rule: its output path follows results_dir
    assert all(_configs(j["shell"]) == expected for j in jobs), [j["shell"] for j in jobs]
    merged = load_config(*(ROOT / f for f in expected))  # what the CLI will see
    data = next(j for j in jobs if j["rule"] == "data")
    assert f"--out-dir {merged.results_dir}/data" in data["shell"]
    trained = sorted(int(re.search(r"--ctx (\d+)", j["shell"]).group(1)) for j in jobs if j["rule"] == "train")
    assert trained == sorted(merged.table1.contexts * len(merged.table1.methods))


def test_overlay_outside_the_repository_is_passed_by_absolute_path(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"eval": {"k": 3}, "table1": {"k": 3}}))
    jobs = plan("paper_tables/table1.csv", "--configfile", str(overlay))
    evals = [j for j in jobs if j["rule"] == "evaluate"]
    assert evals and all(_configs(j["shell"]) == ["config/tiny.yaml", str(overlay)] for j in evals)
    assert all("--k 3 " in j["shell"] for j in evals)


# --------------------------------------------------------------------------- a fresh clone


def _clean_clone(dest: Path) -> Path:
    """The committed files of the repository (what `git clone` gives), without any run outputs."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for rel in filter(None, files.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _plan_in(workdir: Path, *args: str) -> dict[str, int]:
    """Job counts per rule of a real dry run (no --forceall) in ``workdir``."""
    proc = subprocess.run([SNAKEMAKE, "--dry-run", *args], cwd=workdir, env=_env(), capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    stats = out[out.index("Job stats:"):].splitlines()[3:]
    counts = {}
    for line in stats:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_a_fresh_clone_plans_every_job_of_table1(tmp_path):
    """Nothing the DAG writes is committed: a clean clone plans all of Table 1, in either profile."""
    repo = _clean_clone(tmp_path / "clone")
    assert not (repo / "paper_tables").exists()
    expected = {"data": 1, "target": 1, "respond": 1, "gather_responses": 1, "extract": 1, "train": 12,
                "evaluate": 12, "table1": 1, "total": 30}
    assert _plan_in(repo, "paper_tables/table1.csv") == expected
    # The paper profile regenerates in respond.parts (8) jobs, one per GPU.
    assert _plan_in(repo, "paper_tables/table1.csv", "--configfile", "config/paper.yaml") == {
        **expected, "respond": 8, "total": 37}
    # Three training seeds per cell (as config/tiny-seeds.yaml): three times the drafters and evaluations.
    seeds = tmp_path / "seeds.yaml"
    seeds.write_text(yaml.safe_dump({"train": {"seeds": [0, 1, 2]}}))
    assert _plan_in(repo, "paper_tables/table1.csv", "--configfile", str(seeds)) == {
        **expected, "train": 36, "evaluate": 36, "total": 78}


def test_three_seeds_train_and_evaluate_every_cell_three_times():
    cfg = load_config(ROOT / "config" / "tiny.yaml", ROOT / "config" / "tiny-seeds.yaml")
    assert cfg.train.seeds == [0, 1, 2]
    jobs = plan("paper_tables/table1.csv", "--configfile", "config/tiny-seeds.yaml")
    cells = len(cfg.table1.methods) * len(cfg.table1.contexts)
    assert _count(jobs, "train") == _count(jobs, "evaluate") == 3 * cells
    runs = sorted((re.search(r"--method (\w+)", j["shell"]).group(1), int(re.search(r"--ctx (\d+)", j["shell"])[1]),
                   int(re.search(r"--seed (\d+)", j["shell"])[1])) for j in jobs if j["rule"] == "train")
    assert runs == sorted((m, c, s) for m in cfg.table1.methods for c in cfg.table1.contexts for s in (0, 1, 2))
    for job in jobs:
        if job["rule"] == "train":
            seed = re.search(r"--seed (\d+)", job["shell"]).group(1)
            assert re.search(rf"--out-dir results/tiny/drafters/tiny-llama/[a-z0-9]+_ctx\d+_s{seed} ", job["shell"])
        if job["rule"] == "evaluate":  # the seed's drafter, evaluated into the seed's directory
            seed = re.search(r"--seed (\d+)", job["shell"]).group(1)
            assert f"_s{seed} --prompts " in job["shell"] and f"_s{seed}/mt_bench_k5.json" in job["shell"], job["shell"]
    table = next(j for j in jobs if j["rule"] == "table1")
    assert table["shell"].count("--evals") == 1 and table["shell"].count("mt_bench_k5.json") == 3 * cells
    # Stages that use one drafter per cell take the first seed's: drafting cost and the vLLM stage.
    everything = plan("--configfile", "config/tiny-seeds.yaml")
    cost = [j for j in everything if j["rule"] == "drafting_cost_target"]
    assert cost and all("_s0" in j["shell"] and "_s1" not in j["shell"] and "_s2" not in j["shell"] for j in cost)
    vllm = plan("vllm_all", "--configfile", "config/tiny-seeds.yaml")
    assert {re.search(r"_s(\d+)", j["shell"]).group(1) for j in vllm if j["rule"] in ("train", "vllm_eval")} == {"0"}


def test_an_overlay_with_its_own_results_dir_writes_nothing_shared(tmp_path):
    overlay = tmp_path / "exp.yaml"
    overlay.write_text(yaml.safe_dump({"results_dir": "results/exp1"}))
    jobs = plan("--configfile", str(overlay))
    for job in jobs:
        written = " ".join(job.get(k, "") for k in ("output", "log"))
        for path in written.replace(",", " ").split():
            assert path.startswith("results/exp1/"), (job["rule"], path)


def test_a_changed_setting_reruns_what_depends_on_it(tmp_path):
    """Snakemake's params trigger: the tables carry the config digest, the stages their settings."""
    from peagle.config import load_config

    overlay = tmp_path / "k.yaml"
    overlay.write_text(yaml.safe_dump({"table9": {"k": 3}}))
    jobs = plan("--configfile", str(overlay))
    base = load_config(ROOT / "config" / "tiny.yaml")
    changed = load_config(ROOT / "config" / "tiny.yaml", overlay)
    assert base.digest() != changed.digest()
    t9 = next(j for j in jobs if j["rule"] == "table9")
    assert "k3.json" in t9["shell"]


# --------------------------------------------------------------------------- refused at parse time


def test_typo_in_a_key_fails_before_any_job(tmp_path):
    overlay = tmp_path / "typo.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"epoch": 3}}))
    proc = snakemake("paper_tables/table1.csv", "--configfile", str(overlay))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "train.epoch" in out and str(overlay) in out
    assert "Job stats" not in out and "Shell command" not in out


def test_wrong_type_fails_before_any_job(tmp_path):
    overlay = tmp_path / "bad.yaml"
    overlay.write_text(yaml.safe_dump({"runtime": {"threads": "two"}}))
    proc = snakemake("paper_tables/table1.csv", "--configfile", str(overlay))
    assert proc.returncode != 0
    assert "runtime.threads" in proc.stdout + proc.stderr


def test_command_line_config_overrides_are_refused():
    proc = snakemake("paper_tables/table1.csv", "--config", "seed=1")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "--config KEY=VALUE overrides are not supported" in out


@pytest.mark.parametrize("path", ["results/tiny/drafters/tiny-llama/P-EAGLE_ctx64_s0/summary.json",
                                  "results/tiny/drafters/tiny-llama/peagle_ctx64_sX/summary.json",
                                  "results/tiny/drafters/tiny-llama/peagle_ctx64/summary.json"])
def test_unconstrained_wildcards_do_not_match(path):
    proc = snakemake(path)
    assert proc.returncode != 0
    assert "MissingRuleException" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- SLURM profile, lint


def test_slurm_profile_dry_run():
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="./setup.sh installs the SLURM executor plugin")
    jobs = plan("paper_tables/table1.csv", "--profile", "profiles/slurm", "--configfile", "config/paper.yaml")
    assert {j["rule"] for j in jobs} == TABLE1_RULES
    for job in jobs:
        if job["rule"] in GPU_RULES:
            gpus = 8 if job["rule"] == "train" else 1  # training takes a whole node
            assert f"gpu={gpus}," in job["resources"] + "," and "gpu_model=h200" in job["resources"], job
            assert "cpus_per_gpu=16" in job["resources"], job
        if job["rule"] == "train":
            assert job["shell"].startswith("python -m peagle train ") and " --nproc 8 " in job["shell"], job
        assert "cpus_per_task=1," not in job.get("resources", ""), job


@pytest.mark.parametrize("extra", [[], ["--configfile", "config/paper.yaml"]], ids=["tiny", "paper"])
def test_lint_is_clean(extra):
    proc = snakemake("--lint", *extra, dry_run=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- smoke run


def test_smoke_run_of_the_whole_dag(tmp_path):
    """The real DAG (`all`) at minimal sizes (tests/fixtures/smoke.yaml) in a scratch working directory.

    `configfile:` resolves config/tiny.yaml against the working directory (hence the copy);
    --configfile resolves against the caller's cwd. The overlay's results_dir (results/smoke) takes
    everything, tables included: nothing lands in paper_tables/.
    """
    shutil.copytree(ROOT / "config", tmp_path / "config")
    cmd = [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--cores", "2",
           "--directory", str(tmp_path), "--configfile", str(ROOT / "tests" / "fixtures" / "smoke.yaml")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    smoke = load_config(ROOT / "config" / "tiny.yaml", ROOT / "tests" / "fixtures" / "smoke.yaml")
    assert not (tmp_path / "paper_tables").exists() and not (tmp_path / "logs").exists()
    tables = tmp_path / smoke.tables_path
    assert smoke.tables_path == "results/smoke/paper_tables"
    import pandas as pd

    ctx_cols = [f"ctx={c}" for c in smoke.table1.contexts]
    table = pd.read_csv(tables / "table1.csv", keep_default_na=False)
    assert list(table.columns) == ["method", "layers", "n_seeds", *ctx_cols, *(f"{c}_std" for c in ctx_cols),
                                   *(f"{c}_peak_mem_mb" for c in ctx_cols), "budget_mb", "near_budget"]
    rows = table.set_index("method")
    assert list(rows.index) == smoke.table1.methods and (rows["n_seeds"] == 1).all()
    assert rows.loc["peagle", "layers"] == smoke.drafter.num_layers and rows.loc["parallelspec", "layers"] == 1
    assert all(1.0 <= float(v) <= smoke.table1.k + 1 for v in rows[ctx_cols].to_numpy().ravel())
    assert (rows[[f"{c}_std" for c in ctx_cols]] == "").all().all()  # one seed: no spread

    prov = yaml.safe_load((tables / "table1.provenance.json").read_text())
    assert prov["profile"] == "tiny" and prov["config"]["results_dir"] == "results/smoke"
    assert prov["config_digest"] == smoke.digest() and prov["commit"] and prov["machine"]["cpus"]
    assert all(all(c["equal"] for c in run["lossless_checks"]) for cell in prov["cells"].values()
               for run in cell["runs"].values())
    assert prov["seeds"]["train"] == [0] and prov["seed_spread"]["note"].startswith("1 seed, no spread")
    assert len(prov["wall_times_s"]) >= 2 * len(smoke.table1.contexts)
    for stage in ("data", "target", "respond", "extract"):
        assert list((tmp_path / "results/smoke/benchmarks").rglob(f"*{stage}*")), f"no benchmark for {stage}"

    t9 = (tables / "table9.csv").read_text().splitlines()
    assert len(t9) == 1 + len(smoke.targets) * len(smoke.table9.eval_sets)
    assert {line.split(",")[1] for line in t9[1:]} == {"llama", "qwen3_moe"}
    cost = (tables / "drafting_cost.csv").read_text().splitlines()
    assert len(cost) == 1 + len(smoke.targets) * len(smoke.drafting_cost.methods) * len(smoke.drafting_cost.ks)
    cost_prov = yaml.safe_load((tables / "drafting_cost.provenance.json").read_text())
    assert cost_prov["config_digest"] == smoke.digest()
    for fig in ("fig1_lengths", "fig3_mask", "fig4_partition"):
        assert (tables / "figures" / f"{fig}.png").stat().st_size > 0
    report = (tables / "comparison.md").read_text()
    assert "Table 1" in report and "Table 9" in report and "-> current" in report
    # A finished DAG has nothing left to do.
    again = subprocess.run(cmd + ["--dry-run"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr

    # One ablation table on its own, and Figure B from Table 3's regularized run.
    at = cmd.index("--configfile")  # targets before --configfile, which takes every argument after it
    abl = subprocess.run(cmd[:at] + [f"{smoke.tables_path}/table6.csv", f"{smoke.tables_path}/figures/figB_alpha.png"]
                         + cmd[at:], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert abl.returncode == 0, abl.stdout[-4000:] + abl.stderr[-4000:]
    t6 = pd.read_csv(tables / "table6.csv")
    assert list(t6["row"]) == ["train.k_train=4", "train.k_train=5"] and list(t6["humaneval_paper"]) == [2.41, 2.51]
    assert all(1.0 <= v <= smoke.ablations["recipe"].k + 1 for v in t6[["humaneval", "mt_bench"]].to_numpy().ravel())
    assert (tables / "figures" / "figB_alpha.png").stat().st_size > 0

    # One HTML file shows the run: every table and figure marked with report().
    html = tmp_path / "report.html"
    rep = subprocess.run(cmd + ["--report", str(html)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    text = html.read_text(errors="replace")
    for name in ("table1.csv", "table9.csv", "drafting_cost.csv", "comparison.md", "fig1_lengths.png",
                 "fig3_mask.png"):
        assert name in text, name

    # Recording the run: the baselines, their manifest, and a comparison that finds them current.
    from peagle.record import record_run

    recorded = tmp_path / "recorded"
    manifest = record_run(smoke, tables, tmp_path / "results/smoke/benchmarks", recorded,
                          ["config/tiny.yaml", "tests/fixtures/smoke.yaml"], wall_s=1.0)
    assert manifest["config_digest"] == smoke.digest() and manifest["stage_times_s"]["train"]["jobs"] >= 4
    assert {"table1.csv", "table9.csv", "drafting_cost.csv", "figures/fig1_lengths.png"} <= set(manifest["files"])
    assert "-> current" in (recorded / "comparison.md").read_text()
