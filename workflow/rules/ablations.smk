# The training-recipe ablations, Tables 3-8 and Figure B (peagle.ablations; `ablations:` in the
# profile). One target per table: `snakemake --cores all paper_tables/table4.csv` trains and
# evaluates only what Table 4 needs. A run is addressed by the digest of the settings that shape
# it ({run}), so a run two tables share trains once and a row added by an overlay trains alone; a
# run with the profile's own settings is the main DAG's cell (drafters/<target>/<method>_ctx<c>_s<seed>),
# which Tables 1 and 9 may already have trained.

rule train_ablation:
    input:
        target=TARGET_JSON,
        hidden=RESPONSES if ONLINE else HIDDEN_MANIFEST,
    output:
        summary=ABLATION_SUMMARY,
    params:
        config=CONFIG_ARGS,
        settings=settings("seed", "runtime.device", "runtime.dtype"),  # the rest: the {run} digest
        hidden=lambda wildcards, input: input.hidden if ONLINE else os.path.dirname(input.hidden),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        nproc=train_processes,
    log:
        f"{LOGS}/train/{{target}}/ablation/{ABLATION_RUN}.log",
    benchmark:
        ABLATION_TRAIN_BENCH
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle train {params.config} --target {input.target} --hidden {params.hidden}"
        " --method {wildcards.method} --ctx {wildcards.ctx} --seed {wildcards.seed} --ablation-run {wildcards.run}"
        " --out-dir {params.out_dir} --nproc {params.nproc} > {log} 2>&1"


rule evaluate_ablation:
    input:
        target=TARGET_JSON,
        summary=ABLATION_SUMMARY,
        prompts=f"{R}/data/eval_{{evalset}}.jsonl",
    output:
        result=ABLATION_EVAL,
    params:
        config=CONFIG_ARGS,
        settings=settings("seed", "eval.max_new_tokens", "eval.n_prompts", "eval.lossless_check_prompts",
                          "eval.turns", "runtime.device", "runtime.dtype"),
        run_dir=lambda wildcards, input: os.path.dirname(input.summary),
    log:
        f"{LOGS}/evaluate/{{target}}/ablation/{ABLATION_RUN}/{{evalset}}_k{{k}}.log",
    benchmark:
        ABLATION_EVAL_BENCH
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle evaluate {params.config} --target {input.target} --drafter {params.run_dir}"
        " --prompts {input.prompts} --k {wildcards.k} --seed {wildcards.seed} --out {output.result} > {log} 2>&1"


rule ablation_table:
    input:
        evals=lambda wildcards: ablation_evals(wildcards.table),
        benchmarks=lambda wildcards: ablation_benchmarks(wildcards.table),
    output:
        table=f"{TABLES_DIR}/{{table}}.csv",
        provenance=f"{TABLES_DIR}/{{table}}.provenance.json",
    wildcard_constraints:
        table="|".join(ABLATION_TABLES) or "(?!)",
    params:
        config=CONFIG_ARGS,
        digest=lambda wildcards: ablation_digest(CFG, wildcards.table),
    log:
        f"{LOGS}/{{table}}.log",
    benchmark:
        f"{BENCH}/{{table}}.tsv"
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle ablation-table {params.config} --table {wildcards.table} --evals {input.evals}"
        " --benchmarks {input.benchmarks} --out {output.table} > {log} 2>&1"


# Figure B: alpha of the regularized design over training, from its Table 3 run (every seed).
rule fig_alpha:
    input:
        summaries=alpha_summaries,
    output:
        figure=report(f"{FIGB}.png", category="Figures"),
        csv=f"{FIGB}.csv",
    params:
        config=CONFIG_ARGS,
        run_dirs=lambda wildcards, input: [os.path.dirname(s) for s in input.summaries],
        out=lambda wildcards, output: os.path.splitext(output.figure)[0],
    log:
        f"{LOGS}/fig_alpha.log",
    benchmark:
        f"{BENCH}/fig_alpha.tsv"
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle fig-alpha {params.config} --runs {params.run_dirs} --out {params.out} > {log} 2>&1"


rule compare_ablations:
    input:
        [f"{TABLES_DIR}/{t}.csv" for t in ABLATION_TABLES],
    output:
        report=report(ABLATION_COMPARISON, category="Comparison with the paper"),
    params:
        config=CONFIG_ARGS,
        tables_dir=lambda wildcards, output: os.path.dirname(output.report),
        tables=ABLATION_TABLES,
    log:
        f"{LOGS}/compare_ablations.log",
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle compare {params.config} --tables-dir {params.tables_dir} --tables {params.tables}"
        " --out {output.report} > {log} 2>&1"


# Every ablation table, Figure B and their comparison with the paper (not in `all`: on the tiny
# profile about 25 min more, README "Ablations").
rule ablations:
    input:
        ABLATION_TARGETS,
