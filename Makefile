# Entry points (the README's commands). Every target first runs ./setup.sh, which is a no-op
# when .venv is already up to date.
#
#   make tables          tiny profile end to end on this machine -> paper_tables/ (Tables 1 and 9,
#                        drafting cost, comparison with the paper): the `all` rule
#   make table1          only paper_tables/table1.csv
#   make ablations       the training-recipe ablations: paper_tables/table3.csv ... table8.csv, Figure B
#   make table10         the vLLM stage (needs .venv-vllm: envs/setup_vllm_cpu.sh): Table 10, cross-check
#   make test            the test suite (slow workflow tests included)
#   make report          report.html: every table and figure of the last run (snakemake --report)
#   make record          keep the last run's tables as the recorded baselines (results/recorded/tiny/)
#   make record-targets  pretrain every tiny target afresh and record it (results/recorded/tiny/targets/),
#                        for later runs to reuse instead of pretraining (~5 min each at 400 steps)
#   make dry-run-paper   plan the paper profile on SLURM without running anything
#   make clean           remove the tiny profile's results, logs, benchmarks and .snakemake/

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := tables

VENV := .venv
# .venv/bin first on PATH so that the rules' `python` is the venv's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
SNAKEMAKE := $(VENV)/bin/snakemake

.PHONY: setup tables table1 ablations table10 test report record record-targets dry-run-paper lint clean

setup:
	./setup.sh

tables: setup
	$(SNAKEMAKE) --cores all

table1: setup
	$(SNAKEMAKE) --cores all paper_tables/table1.csv

ablations: setup
	$(SNAKEMAKE) --cores all ablations

table10: setup
	envs/setup_vllm_cpu.sh
	$(SNAKEMAKE) --cores all vllm_all

test: setup
	$(VENV)/bin/python -m pytest -q

report: setup
	$(SNAKEMAKE) --report report.html

record: setup
	$(VENV)/bin/python -m peagle record --config config/tiny.yaml

record-targets: setup
	$(SNAKEMAKE) --cores all results/tiny/data/manifest.json
	build=$$(mktemp -d); trap 'rm -rf "$$build"' EXIT; \
	for t in $$($(VENV)/bin/python -c "from peagle.config import load_config; print(*(t.name for t in load_config('config/tiny.yaml').targets))"); do \
	  $(VENV)/bin/python -m peagle target --config config/tiny.yaml --name $$t --data-dir results/tiny/data \
	    --out-dir "$$build/$$t" --record; \
	done

dry-run-paper: setup
	$(SNAKEMAKE) -n --profile profiles/slurm --configfile config/paper.yaml

lint: setup
	$(SNAKEMAKE) --lint

# The tiny profile's outputs (results, logs, benchmarks, tables); results/recorded/ is kept.
clean:
	rm -rf results/tiny paper_tables report.html .snakemake
