# Target hidden states of the regenerated training sequences (safetensors shards + manifest), by
# transformers forwards or, with hidden.backend vllm, by vLLM in its own environment.
VLLM_EXTRACT = CFG.hidden.backend == "vllm"


rule extract:
    input:
        target=TARGET_JSON,
        responses=RESPONSES,
    output:
        manifest=HIDDEN_MANIFEST,
    params:
        config=CONFIG_ARGS,
        settings=settings("hidden", "runtime.device", "runtime.dtype", *(["vllm"] if VLLM_EXTRACT else [])),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        peagle=VLLM_PEAGLE if VLLM_EXTRACT else "python -m peagle",
    log:
        f"{LOGS}/extract/{{target}}.log",
    benchmark:
        f"{BENCH}/extract/{{target}}.tsv"
    threads: VLLM_THREADS if VLLM_EXTRACT else TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        VLLM_CONDA if VLLM_EXTRACT else "../../envs/core.yaml"
    shell:
        "{params.peagle} extract {params.config} --target {input.target} --responses {input.responses}"
        " --out-dir {params.out_dir} > {log} 2>&1"
