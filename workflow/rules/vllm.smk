# vLLM stage (DESIGN §6-7; peagle/vllm_bench.py; docs/vllm_cpu_notes.md): every Table 9 drafter
# served in real vLLM (acceptance from vLLM's counters, checked lossless and parallel iff P-EAGLE,
# cross-checked against the engine's Table 9 evaluation of the same cell), and vLLM's serving
# benchmark behind Table 10. Not part of `all` (it needs the vLLM environment): `make table10`.
# One drafter per cell: the first seed's (FIRST_SEED, the first of train.seeds); no seed spread.
#
# Interpreter: VLLM_PEAGLE (common.smk).

VLLM_BASELINE = f"{R}/vllm/{{target}}/baseline_{{evalset}}.json"
VLLM_EVAL = f"{R}/vllm/{{target}}/{{method}}_ctx{{ctx}}/{{evalset}}_k{{k}}.eval.json"
VLLM_THROUGHPUT = f"{R}/vllm/{{target}}/{{method}}_ctx{{ctx}}/{{evalset}}_k{{k}}.throughput.json"
TABLE10_CSV = f"{TABLES_DIR}/table10.csv"
TABLE10_PROVENANCE = f"{TABLES_DIR}/table10.provenance.json"
VLLM_CROSSCHECK_CSV = f"{TABLES_DIR}/vllm_crosscheck.csv"
_T10 = dict(target=CFG.table10_targets, ctx=[CFG.table9.ctx], evalset=CFG.table10.eval_sets)
TABLE10_RESULTS = (expand(VLLM_THROUGHPUT, method=["peagle"], k=CFG.table10.ks, **_T10)
                   + expand(VLLM_THROUGHPUT, method=["eagle3"], k=CFG.table10.eagle3_ks, **_T10))


rule vllm_baseline:
    input:
        target=TARGET_JSON,
        prompts=f"{R}/data/eval_{{evalset}}.jsonl",
    output:
        result=VLLM_BASELINE,
    params:
        config=CONFIG_ARGS,
        settings=settings("eval.max_new_tokens", "eval.n_prompts", "vllm", "runtime.device"),
    log:
        f"{LOGS}/vllm/{{target}}/baseline_{{evalset}}.log",
    benchmark:
        f"{BENCH}/vllm/{{target}}/baseline_{{evalset}}.tsv"
    threads: VLLM_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        VLLM_CONDA
    shell:
        f"{VLLM_PEAGLE} vllm-eval {{params.config}} --target {{input.target}} --prompts {{input.prompts}}"
        " --out {output.result} > {log} 2>&1"


rule vllm_eval:
    input:
        target=TARGET_JSON,
        summary=first_seed(DRAFTER_SUMMARY),
        prompts=f"{R}/data/eval_{{evalset}}.jsonl",
        baseline=VLLM_BASELINE,
        engine=first_seed(EVAL_JSON),
    output:
        result=VLLM_EVAL,
    params:
        config=CONFIG_ARGS,
        settings=settings("eval.max_new_tokens", "eval.n_prompts", "vllm", "runtime.device"),
        run_dir=lambda wildcards, input: os.path.dirname(input.summary),
    log:
        f"{LOGS}/vllm/{{target}}/{{method}}_ctx{{ctx}}/{{evalset}}_k{{k}}.eval.log",
    benchmark:
        f"{BENCH}/vllm/{{target}}/{{method}}_ctx{{ctx}}/{{evalset}}_k{{k}}.eval.tsv"
    threads: VLLM_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        VLLM_CONDA
    shell:
        f"{VLLM_PEAGLE} vllm-eval {{params.config}} --target {{input.target}} --drafter {{params.run_dir}}"
        " --prompts {input.prompts} --k {wildcards.k} --baseline {input.baseline}"
        " --engine-result {input.engine} --out {output.result} > {log} 2>&1"


rule vllm_throughput:
    input:
        target=TARGET_JSON,
        summary=first_seed(DRAFTER_SUMMARY),
        prompts=f"{R}/data/eval_{{evalset}}.jsonl",
    output:
        result=VLLM_THROUGHPUT,
    params:
        config=CONFIG_ARGS,
        settings=settings("vllm", "runtime.device"),
        run_dir=lambda wildcards, input: os.path.dirname(input.summary),
    log:
        f"{LOGS}/vllm/{{target}}/{{method}}_ctx{{ctx}}/{{evalset}}_k{{k}}.throughput.log",
    benchmark:
        f"{BENCH}/vllm/{{target}}/{{method}}_ctx{{ctx}}/{{evalset}}_k{{k}}.throughput.tsv"
    threads: VLLM_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        VLLM_CONDA
    shell:
        f"{VLLM_PEAGLE} vllm-throughput {{params.config}} --target {{input.target}} --drafter {{params.run_dir}}"
        " --prompts {input.prompts} --k {wildcards.k} --out {output.result} > {log} 2>&1"


# Tables: plain Python in the core environment.
rule table10:
    input:
        results=TABLE10_RESULTS,
    output:
        table=report(TABLE10_CSV, caption="../report/table10.rst", category="Tables"),
        provenance=TABLE10_PROVENANCE,
    params:
        config=CONFIG_ARGS,
        digest=CONFIG_DIGEST,
        settings=settings("profile", "results_dir", "table10", "vllm.concurrency"),
    log:
        f"{LOGS}/table10.log",
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle table10 {params.config} --results {input.results} --out {output.table} > {log} 2>&1"


rule vllm_crosscheck:
    input:
        results=expand(VLLM_EVAL, **TABLE9_CELLS),
    output:
        table=report(VLLM_CROSSCHECK_CSV, caption="../report/vllm_crosscheck.rst", category="Tables"),
    log:
        f"{LOGS}/vllm_crosscheck.log",
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle vllm-crosscheck --results {input.results} --out {output.table} > {log} 2>&1"


rule vllm_all:
    input:
        TABLE10_CSV,
        VLLM_CROSSCHECK_CSV,
