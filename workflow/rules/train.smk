# One drafter per (method, training context length): DRAFTER_DIR/final/ is the vLLM-loadable model.


rule train:
    input:
        target=TARGET_JSON,
        hidden=HIDDEN_MANIFEST,
    output:
        config=DRAFTER_CONFIG,
    params:
        config=CONFIG_ARGS,
        settings=settings("seed", "drafter", "train", "runtime.device", "runtime.dtype"),
        hidden_dir=lambda wildcards, input: os.path.dirname(input.hidden),
        out_dir=lambda wildcards, output: os.path.dirname(os.path.dirname(output.config)),
    log:
        f"{LOGS}/train/{{method}}_ctx{{ctx}}.log",
    benchmark:
        TRAIN_BENCH
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle train {params.config} --target {input.target} --hidden-dir {params.hidden_dir}"
        " --method {wildcards.method} --ctx {wildcards.ctx} --out-dir {params.out_dir} > {log} 2>&1"
