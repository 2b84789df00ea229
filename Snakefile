# peagle: the P-EAGLE reproduction pipeline.
#
#   snakemake --cores all paper_tables/table1.csv                                   # tiny, CPU
#   snakemake paper_tables/table1.csv --profile profiles/slurm --configfile config/paper.yaml
#
# Put targets BEFORE --configfile: it takes one or more values and would swallow a target after it.
#
# Every rule is a thin `shell:` call of the package CLI (`python -m peagle <stage> ...`); the
# stages and the files between them are described in docs/ARCHITECTURE.md.
#
# Configuration: `config/tiny.yaml` is the default and each `--configfile F` is deep-merged over it
# in the order given (Snakemake 9 semantics), except that a file with a top-level `profile:` key
# (config/tiny.yaml, config/paper.yaml) is a complete profile and starts the merge afresh, so
# tiny.yaml settings never leak into a paper run; files without `profile:` are overlays. The CLI
# receives exactly the files in effect, in merge order (`--config config/paper.yaml --config
# overlay.yaml`), so the Snakefile and every job see the same config. `--config KEY=VALUE`
# overrides are refused (the CLI would not see them): put them in a small YAML file and pass it
# with --configfile. The merged config is validated before any job runs, against
# workflow/schemas/config.schema.yaml and peagle.config; see workflow/rules/common.smk.

from snakemake.utils import min_version

min_version("9.19")

configfile: "config/tiny.yaml"


report: "workflow/report/workflow.rst"


# Before the includes: global constraints apply to the rules defined after them.
wildcard_constraints:
    method=r"[a-z0-9]+",
    ctx=r"\d+",
    seed=r"\d+",
    k=r"\d+",
    evalset=r"[a-z0-9_]+",
    target=r"[A-Za-z0-9][A-Za-z0-9.-]*",
    part=r"\d+",
    run=r"[0-9a-f]{12}",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/target.smk"
include: "workflow/rules/hidden.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/tables.smk"
include: "workflow/rules/scaling.smk"
include: "workflow/rules/vllm.smk"
include: "workflow/rules/compare.smk"
include: "workflow/rules/ablations.smk"


localrules:
    all,
    table1,
    table9,
    drafting_cost,
    compare,
    table10,
    vllm_crosscheck,
    vllm_all,


rule all:
    default_target: True
    input:
        TABLE1_CSV,
        TABLE1_PROVENANCE,
        TABLE9_CSV,
        TABLE9_PROVENANCE,
        DRAFTING_COST_CSV,
        TARGET_QUALITY_CSV,
        COMPARISON,
        f"{FIG1}.png",
        f"{FIG3}.png",
        f"{FIG4}.png",
