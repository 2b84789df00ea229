# Training-overhead and memory results: paper Table 2, Figs. 3-4, and the memory-scaling sweep.
# Each writes a provenance sidecar beside its table (*.provenance.json, written by the CLI).

TABLE2_CSV = f"{TABLES_DIR}/table2.csv"
TABLE2_PROVENANCE = f"{TABLES_DIR}/table2.provenance.json"
# Figures are written as PNG (shown in `snakemake --report`) and PDF.
FIG3 = f"{FIGURES_DIR}/fig3_mask"
FIG4 = f"{FIGURES_DIR}/fig4_partition"
MEMORY_CSV = f"{TABLES_DIR}/memory_scaling.csv"
MEMORY_PROVENANCE = f"{TABLES_DIR}/memory_scaling.provenance.json"
MEMORY_FIG = f"{FIGURES_DIR}/memory_scaling"


rule table2:
    input:
        target=for_target(TARGET_JSON, CFG.table1_target),
        hidden=for_target(HIDDEN_MANIFEST, CFG.table1_target),
    output:
        table=report(TABLE2_CSV, caption="../report/table2.rst", category="Tables"),
        provenance=TABLE2_PROVENANCE,
    params:
        config=CONFIG_ARGS,
        digest=CONFIG_DIGEST,
        settings=settings("seed", "first_seed", "scaling", "train", "drafter", "methods", "runtime"),
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
        fig3=report(f"{FIG3}.png", caption="../report/fig3.rst", category="Figures"),
        fig3_pdf=f"{FIG3}.pdf",
        fig4=report(f"{FIG4}.png", caption="../report/fig4.rst", category="Figures"),
        fig4_pdf=f"{FIG4}.pdf",
    params:
        config=CONFIG_ARGS,
        digest=CONFIG_DIGEST,
        settings=settings("scaling.fig4_segments"),
        out_dir=lambda wildcards, output: os.path.dirname(output.fig3),
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
        table=report(MEMORY_CSV, caption="../report/memory_scaling.rst", category="Tables"),
        provenance=MEMORY_PROVENANCE,
        figure=report(f"{MEMORY_FIG}.png", caption="../report/memory_scaling.rst", category="Figures"),
        figure_pdf=f"{MEMORY_FIG}.pdf",
    params:
        config=CONFIG_ARGS,
        digest=CONFIG_DIGEST,
        settings=settings(
            "seed", "first_seed", "scaling", "train", "drafter", "target.hidden_size", "target.vocab_size", "runtime"
        ),
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
        "python -m peagle memory-scaling {params.config} --out {output.table} --figure {output.figure}"
        " > {log} 2>&1"


# Paper Fig. 1: length distribution (prompt + response, target tokens) of the main target's
# regenerated training data, with median/P90/P99 and the same numbers in a CSV.
FIG1 = f"{FIGURES_DIR}/fig1_lengths"


rule fig1:
    input:
        responses=for_target(RESPONSES, CFG.table1_target),
    output:
        fig=report(f"{FIG1}.png", caption="../report/fig1.rst", category="Figures"),
        pdf=f"{FIG1}.pdf",
        csv=f"{FIG1}.csv",
    params:
        config=CONFIG_ARGS,
        digest=CONFIG_DIGEST,
        settings=settings("table1.contexts"),
        out=lambda wildcards, output: os.path.splitext(output.fig)[0],
        name=CFG.table1_target,
    log:
        f"{LOGS}/fig1.log",
    threads: 1
    conda:
        "../../envs/core.yaml"
    shell:
        "python -m peagle fig1 {params.config} --responses {input.responses} --out {params.out}"
        " --target-name {params.name} > {log} 2>&1"
