# Paper tables. One path per table whichever profile fills it; each CLI writes a provenance
# sidecar (*.provenance.json, peagle.provenance.write_table) with the profile, config digest,
# commit, machine, inputs and measured wall times. `digest` (CONFIG_DIGEST) is a param of every
# table rule: another profile or a changed setting rewrites the table. Tables 1 and 9 take every
# seed of train.seeds per cell (mean and standard deviation); drafting cost the first seed's drafters.


rule table1:
    input:
        target=for_target(TARGET_JSON, CFG.table1_target),
        evals=expand(EVAL_JSON, seed=SEEDS, **TABLE1_CELLS),
        train_benchmarks=expand(TRAIN_BENCH, target=CFG.table1_target, method=CFG.table1.methods,
                                ctx=CFG.table1.contexts, seed=SEEDS),
        eval_benchmarks=expand(EVAL_BENCH, seed=SEEDS, **TABLE1_CELLS),
        stage_benchmarks=stage_benchmarks(CFG.table1_target),
    output:
        table=report(TABLE1_CSV, caption="../report/table1.rst", category="Tables"),
        provenance=TABLE1_PROVENANCE,
    params:
        config=CONFIG_ARGS,
        digest=CONFIG_DIGEST,
        settings=settings("profile", "results_dir", "table1", "train.memory_budget_mb", "train.time_budget_s_per_epoch"),
    log:
        f"{LOGS}/table1.log",
    benchmark:
        f"{BENCH}/table1.tsv"
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle table1 {params.config} --target {input.target} --evals {input.evals}"
        " --benchmarks {input.stage_benchmarks} {input.train_benchmarks} {input.eval_benchmarks}"
        " --out {output.table} > {log} 2>&1"


rule table9:
    input:
        evals=expand(EVAL_JSON, seed=SEEDS, **TABLE9_CELLS),
    output:
        table=report(TABLE9_CSV, caption="../report/table9.rst", category="Tables"),
        provenance=TABLE9_PROVENANCE,
    params:
        config=CONFIG_ARGS,
        digest=CONFIG_DIGEST,
        settings=settings("profile", "results_dir", "table9"),
    log:
        f"{LOGS}/table9.log",
    benchmark:
        f"{BENCH}/table9.tsv"
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle table9 {params.config} --evals {input.evals} --out {output.table} > {log} 2>&1"


# Drafting cost (the CPU counterpart of Table 10): per target, every drafting_cost method's
# Table 9 drafter of the first seed (FIRST_SEED) at each K, measured by the engine at concurrency
# 1; then one table.
rule drafting_cost_target:
    input:
        target=TARGET_JSON,
        summaries=lambda wildcards: expand(
            first_seed(DRAFTER_SUMMARY), target=wildcards.target, method=CFG.drafting_cost.methods,
            ctx=CFG.table9.ctx,
        ),
        prompts=f"{R}/data/eval_{CFG.drafting_cost.eval_set}.jsonl",
    output:
        table=f"{R}/drafting_cost/{{target}}.csv",
    params:
        config=CONFIG_ARGS,
        settings=settings("drafting_cost", "runtime", "first_seed"),
        run_dirs=lambda wildcards, input: [os.path.dirname(s) for s in input.summaries],
    log:
        f"{LOGS}/drafting_cost/{{target}}.log",
    benchmark:
        f"{BENCH}/drafting_cost/{{target}}.tsv"
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle drafting-cost {params.config} --target {input.target} --drafters {params.run_dirs}"
        " --prompts {input.prompts} --no-progress --out {output.table} > {log} 2>&1"


rule drafting_cost:
    input:
        expand(f"{R}/drafting_cost/{{target}}.csv", target=CFG.table9_targets),
    output:
        table=report(DRAFTING_COST_CSV, caption="../report/drafting_cost.rst", category="Tables"),
    params:
        digest=CONFIG_DIGEST,
    log:
        f"{LOGS}/drafting_cost.log",
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle concat-csv {input} --table drafting_cost --out {output.table} > {log} 2>&1"


# Our tables beside the paper's recorded numbers, with a verdict on the qualitative shape.
# Table 2 (rule table2, not part of `all`: it takes ~20 min) is compared when it is present.
rule compare:
    input:
        TABLE1_CSV,
        TABLE9_CSV,
        DRAFTING_COST_CSV,
    output:
        report=report(COMPARISON, caption="../report/comparison.rst", category="Comparison with the paper"),
    params:
        config=CONFIG_ARGS,
        digest=CONFIG_DIGEST,
        tables_dir=lambda wildcards, output: os.path.dirname(output.report),
    log:
        f"{LOGS}/compare.log",
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle compare {params.config} --tables-dir {params.tables_dir} --out {output.report} > {log} 2>&1"
