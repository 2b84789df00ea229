# The frozen target: built and pretrained here (tiny) or recorded from Hugging Face (paper), and
# its greedy responses to the training prompts.


rule target:
    input:
        train=DATA_FILES["train"],
        evals=[DATA_FILES[s] for s in ("mt_bench", "humaneval", "gsm8k")],
    output:
        target=TARGET_JSON,
    params:
        config=CONFIG_ARGS,
        settings=settings("profile", "seed", "target", "eval.sets", "runtime.device", "runtime.dtype"),
        data_dir=lambda wildcards, input: os.path.dirname(input.train),
        out_dir=lambda wildcards, output: os.path.dirname(output.target),
    log:
        f"{LOGS}/target.log",
    benchmark:
        f"{BENCH}/target.tsv"
    threads: TORCH_THREADS
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle target {params.config} --data-dir {params.data_dir} --out-dir {params.out_dir}"
        " > {log} 2>&1"


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
        f"{LOGS}/respond.log",
    benchmark:
        f"{BENCH}/respond.tsv"
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle respond {params.config} --target {input.target} --prompts {input.prompts}"
        " --out {output.responses} > {log} 2>&1"
