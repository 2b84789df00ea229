# Target hidden states of the regenerated training sequences (safetensors shards + manifest).


rule extract:
    input:
        target=TARGET_JSON,
        responses=RESPONSES,
    output:
        manifest=HIDDEN_MANIFEST,
    params:
        config=CONFIG_ARGS,
        settings=settings("hidden", "runtime.device", "runtime.dtype"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    log:
        f"{LOGS}/extract/{{target}}.log",
    benchmark:
        f"{BENCH}/extract/{{target}}.tsv"
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle extract {params.config} --target {input.target} --responses {input.responses}"
        " --out-dir {params.out_dir} > {log} 2>&1"
