# Training-overhead and memory results: paper Table 2, Figs. 3-4, and the memory-scaling sweep.
# Each writes a provenance sidecar beside its table (*.provenance.json, written by the CLI).

TABLE2_CSV = "paper_tables/table2.csv"
TABLE2_PROVENANCE = "paper_tables/table2.provenance.json"
FIGURES_DIR = "paper_tables/figures"
FIG3 = expand(f"{FIGURES_DIR}/fig3_mask.{{ext}}", ext=["png", "pdf"])
FIG4 = expand(f"{FIGURES_DIR}/fig4_partition.{{ext}}", ext=["png", "pdf"])
MEMORY_CSV = "paper_tables/memory_scaling.csv"
MEMORY_PROVENANCE = "paper_tables/memory_scaling.provenance.json"
MEMORY_FIG = expand(f"{FIGURES_DIR}/memory_scaling.{{ext}}", ext=["png", "pdf"])


rule table2:
    input:
        target=for_target(TARGET_JSON, CFG.table1_target),
        hidden=for_target(HIDDEN_MANIFEST, CFG.table1_target),
    output:
        table=TABLE2_CSV,
        provenance=TABLE2_PROVENANCE,
    params:
        config=CONFIG_ARGS,
        settings=settings("seed", "scaling", "train", "drafter", "methods", "runtime"),
        hidden_dir=lambda wildcards, input: os.path.dirname(input.hidden),
    log:
        f"{LOGS}/table2.log",
    benchmark:
        f"{BENCH}/table2.tsv"
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle table2 {params.config} --target {input.target} --hidden-dir {params.hidden_dir}"
        " --out {output.table} > {log} 2>&1"


rule figures:
    output:
        fig3=FIG3,
        fig4=FIG4,
    params:
        config=CONFIG_ARGS,
        settings=settings("scaling.fig4_segments"),
        out_dir=lambda wildcards, output: os.path.dirname(output.fig3[0]),
    log:
        f"{LOGS}/figures.log",
    benchmark:
        f"{BENCH}/figures.tsv"
    threads: 1
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle figures {params.config} --out-dir {params.out_dir} > {log} 2>&1"


rule memory_scaling:
    output:
        table=MEMORY_CSV,
        provenance=MEMORY_PROVENANCE,
        figure=MEMORY_FIG,
    params:
        config=CONFIG_ARGS,
        settings=settings("seed", "scaling", "train", "drafter", "target.hidden_size", "target.vocab_size", "runtime"),
    log:
        f"{LOGS}/memory_scaling.log",
    benchmark:
        f"{BENCH}/memory_scaling.tsv"
    threads: TORCH_THREADS
    resources:
        **GPU_RESOURCES,
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle memory-scaling {params.config} --out {output.table} --figure {output.figure[0]}"
        " > {log} 2>&1"


# Paper Fig. 1: length distribution (prompt + response, target tokens) of the main target's
# regenerated training data, with median/P90/P99 and the same numbers in a CSV.
FIG1 = expand(f"{FIGURES_DIR}/fig1_lengths.{{ext}}", ext=["png", "pdf", "csv"])


rule fig1:
    input:
        responses=for_target(RESPONSES, CFG.table1_target),
    output:
        fig=FIG1,
    params:
        config=CONFIG_ARGS,
        settings=settings("table1.contexts"),
        out=lambda wildcards, output: os.path.splitext(output.fig[0])[0],
        name=CFG.table1_target,
    log:
        f"{LOGS}/fig1.log",
    threads: 1
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle fig1 {params.config} --responses {input.responses} --out {params.out}"
        " --target-name {params.name} > {log} 2>&1"
