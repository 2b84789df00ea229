# Paper tables. One path per table whichever profile fills it; the provenance sidecar
# (table1.provenance.json, written by the CLI) records the profile, config files and inputs.


rule table1:
    input:
        target=TARGET_JSON,
        evals=expand(EVAL_JSON, **TABLE1_CELLS),
        train_benchmarks=expand(TRAIN_BENCH, method=CFG.table1.methods, ctx=CFG.table1.contexts),
        eval_benchmarks=expand(EVAL_BENCH, **TABLE1_CELLS),
        stage_benchmarks=[f"{BENCH}/{stage}.tsv" for stage in ("data", "target", "respond", "extract")],
    output:
        table=TABLE1_CSV,
        provenance=TABLE1_PROVENANCE,
    params:
        config=CONFIG_ARGS,
        settings=settings("profile", "results_dir", "table1"),
    log:
        f"{LOGS}/table1.log",
    benchmark:
        f"{BENCH}/table1.tsv"
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle table1 {params.config} --target {input.target} --evals {input.evals}"
        " --benchmarks {input.stage_benchmarks} {input.train_benchmarks} {input.eval_benchmarks} --out {output.table} > {log} 2>&1"
