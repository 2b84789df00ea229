# Acceptance length of one drafter on one evaluation set at speculation depth k.


rule evaluate:
    input:
        target=TARGET_JSON,
        drafter=DRAFTER_CONFIG,
        prompts=f"{R}/data/eval_{{evalset}}.jsonl",
    output:
        result=EVAL_JSON,
    params:
        config=CONFIG_ARGS,
        settings=settings(
            "seed", "eval.max_new_tokens", "eval.n_prompts", "eval.lossless_check_prompts",
            "runtime.device", "runtime.dtype",
        ),
        drafter_dir=lambda wildcards, input: os.path.dirname(input.drafter),
    log:
        f"{LOGS}/evaluate/{{method}}_ctx{{ctx}}/{{evalset}}_k{{k}}.log",
    benchmark:
        EVAL_BENCH
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle evaluate {params.config} --target {input.target} --drafter {params.drafter_dir}"
        " --prompts {input.prompts} --k {wildcards.k} --out {output.result} > {log} 2>&1"
