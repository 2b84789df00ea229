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


# Regeneration is data-parallel: respond.parts jobs (one per GPU on a cluster), each generating
# its share of the resumable shards (peagle.generate), then one gather. A killed part reruns only
# its missing shards: the shard directory is no declared output, so Snakemake leaves it in place.
rule respond:
    input:
        target=TARGET_JSON,
        prompts=DATA_FILES["train"],
    output:
        part=RESPONSE_PART,
    params:
        config=CONFIG_ARGS,
        settings=settings("respond", "runtime.device", "runtime.dtype", *(["vllm"] if VLLM_RESPOND else [])),
        shard_dir=lambda wildcards: for_target(RESPONSE_SHARDS, wildcards.target),
        peagle=VLLM_PEAGLE if VLLM_RESPOND else "python -m peagle",
    log:
        f"{LOGS}/respond/{{target}}.part{{part}}.log",
    benchmark:
        f"{BENCH}/respond/{{target}}.part{{part}}.tsv"
    threads: VLLM_THREADS if VLLM_RESPOND else TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        VLLM_CONDA if VLLM_RESPOND else "../../envs/core.yaml"
    shell:
        "{params.peagle} respond {params.config} --target {input.target} --prompts {input.prompts}"
        " --part {wildcards.part} --shard-dir {params.shard_dir} --out {output.part} > {log} 2>&1"


rule gather_responses:
    input:
        parts=lambda wildcards: expand(for_target(RESPONSE_PART, wildcards.target), part=range(CFG.respond.parts)),
    output:
        responses=RESPONSES,
    params:
        config=CONFIG_ARGS,
    log:
        f"{LOGS}/respond/{{target}}.gather.log",
    benchmark:
        f"{BENCH}/respond/{{target}}.gather.tsv"
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle gather-responses {params.config} --parts {input.parts} --out {output.responses} > {log} 2>&1"


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
