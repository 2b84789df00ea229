# Prompts: synthetic (tiny) or the paper's Hugging Face sets (paper; needs network on the node).


rule data:
    output:
        train=DATA_FILES["train"],
        mt_bench=DATA_FILES["mt_bench"],
        humaneval=DATA_FILES["humaneval"],
        gsm8k=DATA_FILES["gsm8k"],
        manifest=DATA_FILES["manifest"],
    params:
        config=CONFIG_ARGS,
        settings=settings("profile", "seed", "data"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    log:
        f"{LOGS}/data.log",
    benchmark:
        f"{BENCH}/data.tsv"
    threads: 1
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle data {params.config} --out-dir {params.out_dir} > {log} 2>&1"
