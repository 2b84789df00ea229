# The frozen targets (the profile's `target` and `extra_targets`, by name): built and pretrained
# here (tiny) or recorded from Hugging Face (paper), and their greedy responses to the training
# prompts. All targets share the prompts of the data rule.


rule target:
    input:
        train=DATA_FILES["train"],
        evals=[DATA_FILES[s] for s in ("mt_bench", "humaneval", "gsm8k")],
        manifest=DATA_FILES["manifest"],
        recorded=recorded_target,
    output:
        target=TARGET_JSON,
    params:
        config=CONFIG_ARGS,
        settings=target_settings("profile", "seed", "eval.sets", "runtime.device", "runtime.dtype"),
        data_dir=lambda wildcards, input: os.path.dirname(input.train),
        out_dir=lambda wildcards, output: os.path.dirname(output.target),
    log:
        f"{LOGS}/target/{{target}}.log",
    benchmark:
        f"{BENCH}/target/{{target}}.tsv"
    threads: TORCH_THREADS
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle target {params.config} --name {wildcards.target} --data-dir {params.data_dir}"
        " --out-dir {params.out_dir} > {log} 2>&1"


rule respond:
    input:
        target=TARGET_JSON,
        prompts=DATA_FILES["train"],
    output:
        responses=RESPONSES,
    params:
        config=CONFIG_ARGS,
        settings=settings("respond", "runtime.device", "runtime.dtype"),
    log:
        f"{LOGS}/respond/{{target}}.log",
    benchmark:
        f"{BENCH}/respond/{{target}}.tsv"
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle respond {params.config} --target {input.target} --prompts {input.prompts}"
        " --out {output.responses} > {log} 2>&1"


# Does each target write text like its training data (repetition and cap rate of its greedy
# answers to held-out prompts beside the reference texts)? One table over all targets.
rule target_quality:
    input:
        targets=expand(TARGET_JSON, target=TARGET_NAMES),
        evals=[DATA_FILES[s] for s in ("mt_bench", "humaneval", "gsm8k")],
    output:
        table=report(TARGET_QUALITY_CSV, caption="../report/target_quality.rst", category="Tables"),
    params:
        config=CONFIG_ARGS,
        digest=CONFIG_DIGEST,
        data_dir=lambda wildcards, input: os.path.dirname(input.evals[0]),
    log:
        f"{LOGS}/target_quality.log",
    benchmark:
        f"{BENCH}/target_quality.tsv"
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle target-quality {params.config} --targets {input.targets}"
        " --data-dir {params.data_dir} --out {output.table} > {log} 2>&1"
