# Acceptance length of one drafter (one seed's run) on one evaluation set at speculation depth k.
# A training run that ended OOM or infeasible gives a result file with that status (no decoding).


rule evaluate:
    input:
        target=TARGET_JSON,
        summary=DRAFTER_SUMMARY,
        prompts=f"{R}/data/eval_{{evalset}}.jsonl",
    output:
        result=EVAL_JSON,
    params:
        config=CONFIG_ARGS,
        settings=settings(
            "seed", "eval.max_new_tokens", "eval.n_prompts", "eval.lossless_check_prompts",
            "runtime.device", "runtime.dtype",
        ),
        run_dir=lambda wildcards, input: os.path.dirname(input.summary),
    log:
        f"{LOGS}/evaluate/{{target}}/{RUN}/{{evalset}}_k{{k}}.log",
    benchmark:
        EVAL_BENCH
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle evaluate {params.config} --target {input.target} --drafter {params.run_dir}"
        " --prompts {input.prompts} --k {wildcards.k} --seed {wildcards.seed} --out {output.result} > {log} 2>&1"
