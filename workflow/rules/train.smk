# One drafter per (target, method, training context length, seed). DRAFTER_DIR/final/ is the
# vLLM-loadable model; summary.json is the run's result, also when the run ends OOM under
# train.memory_budget_mb or infeasible under train.time_budget_s_per_epoch (then it records the
# measurement and there is no final/). Those cells are results, so the job succeeds. The seed
# (drafter initialisation, COD sampling, data order) is the {seed} wildcard, one of train.seeds.
# A run killed for host memory (the kernel's OOM killer) is an OOM result too (peagle.supervise).
# A job given more than one GPU (profiles/slurm: a whole node) trains data-parallel under torchrun,
# one process per GPU (peagle.distributed); train.grad_accum stays the global batch.


# train.hidden_source online: no store; the target computes the hidden states from the responses.
ONLINE = CFG.train.hidden_source == "online"


rule train:
    input:
        target=TARGET_JSON,
        hidden=RESPONSES if ONLINE else HIDDEN_MANIFEST,
    output:
        summary=DRAFTER_SUMMARY,
    params:
        config=CONFIG_ARGS,
        settings=settings("seed", "drafter", "train", "methods", "runtime.device", "runtime.dtype"),
        hidden=lambda wildcards, input: input.hidden if ONLINE else os.path.dirname(input.hidden),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        nproc=train_processes,
    log:
        f"{LOGS}/train/{{target}}/{RUN}.log",
    benchmark:
        TRAIN_BENCH
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle train {params.config} --target {input.target} --hidden {params.hidden}"
        " --method {wildcards.method} --ctx {wildcards.ctx} --seed {wildcards.seed} --out-dir {params.out_dir}"
        " --nproc {params.nproc} > {log} 2>&1"
