# Compare your own drafter (one this DAG did not train; this suite's or the speculators format) with
# the recorded EAGLE-3 / P-EAGLE baselines of results/recorded/<profile>/ (`peagle record`):
#
#   cp compare/example.yaml compare/mine.yaml   # set `drafter:` (and `target:`)
#   snakemake --cores all compare/mine.md        # + compare/mine.csv, compare/mine_al_vs_k.png
#
# Same evaluation sets, K values and settings as the baselines (table9.*, drafting_cost.*, eval.*).
# The baselines are one drafter per cell, the first of train.seeds (Table 9's cell of that seed, and
# the drafting-cost sweep, made with that seed's drafters): no seed spread. A drafter of this DAG
# is named with its seed, e.g. results/tiny/drafters/tiny-llama/peagle_ctx256_s0/final.


rule compare_drafter:
    input:
        spec="compare/{name}.yaml",
        drafter=compare_drafter_input,
        target=lambda wildcards: for_target(TARGET_JSON, compare_spec(wildcards)["target"]),
        data=sorted({DATA_FILES[s] for s in CFG.table9.eval_sets} | {DATA_FILES[CFG.drafting_cost.eval_set]}),
    output:
        report="compare/{name}.md",
        table="compare/{name}.csv",
        provenance="compare/{name}.provenance.json",
        figure="compare/{name}_al_vs_k.png",
    wildcard_constraints:
        name=r"[A-Za-z0-9][A-Za-z0-9.-]*",
    params:
        config=CONFIG_ARGS,
        settings=settings("seed", "eval", "table9", "drafting_cost", "runtime.device", "runtime.dtype"),
        data_dir=lambda wildcards, input: os.path.dirname(input.data[0]),
        recorded=RECORDED_DIR,
        drafter=lambda wildcards: compare_spec(wildcards)["drafter"],
    log:
        f"{LOGS}/compare_drafter/{{name}}.log",
    benchmark:
        f"{BENCH}/compare_drafter/{{name}}.tsv"
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle compare-drafter {params.config} --drafter {params.drafter:q} --target {input.target}"
        " --data-dir {params.data_dir} --recorded {params.recorded} --out {output.report}"
        " --name {wildcards.name} --no-progress > {log} 2>&1"
