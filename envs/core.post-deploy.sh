#!/usr/bin/env bash
# Run by Snakemake inside the freshly created envs/core.yaml env (see the comment there), from the
# working directory: install the peagle package itself, editable, without touching dependencies.
set -euo pipefail
if [ ! -f pyproject.toml ] || ! grep -q '^name = "peagle"' pyproject.toml; then
    echo "core.post-deploy.sh: run snakemake from the peagle repository root (cwd: $PWD)" >&2
    exit 1
fi
python -m pip install --no-deps --no-build-isolation -e .
