#!/usr/bin/env bash
# Idempotent environment setup: ./.venv with the CPU build of torch, peagle (editable) and its
# test and workflow tools. A second run with nothing changed does nothing (it checks a stamp
# keyed on the sha256 of pyproject.toml and this script). FORCE=1 ./setup.sh reinstalls.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.peagle-setup.sha256
# torch first and pinned exactly: on this project's machines `torch==2.13.0` resolves to the local
# CPU wheel (a find-links folder). A range or a bare `torch` would let pip pull the CUDA build and
# several GB of NVIDIA wheels. On GPU nodes (paper profile) install the CUDA build of the same
# version yourself before running this script; it is then kept.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# The SLURM executor for the paper profile (profiles/slurm); small, installs in seconds.
SLURM_PLUGIN="snakemake-executor-plugin-slurm"

say() { printf '[setup] %s\n' "$*"; }

want=$( (cat pyproject.toml setup.sh; echo "$TORCH_SPEC") | sha256sum | cut -d' ' -f1)

if [ "${FORCE:-0}" != 1 ] && [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
    && "$VENV/bin/python" -c "import peagle, torch, snakemake, snakemake_executor_plugin_slurm" 2>/dev/null; then
    say "environment up to date ($VENV, stamp ${want:0:12}); nothing to do"
    exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PYTHON --version 2>&1) ($(command -v "$PYTHON"))"
    "$PYTHON" -m venv "$VENV"
else
    say "using existing $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

say "upgrading pip"
"${PIP[@]}" install --quiet --upgrade pip

have_torch=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [[ "$have_torch" == "${TORCH_SPEC#torch==}"* ]]; then
    say "torch $have_torch already installed"
else
    say "installing $TORCH_SPEC first"
    "${PIP[@]}" install "$TORCH_SPEC"
fi

say "installing peagle (editable) with test extras"
"${PIP[@]}" install --quiet -e ".[test]"

say "installing $SLURM_PLUGIN (for profiles/slurm)"
"${PIP[@]}" install --quiet "$SLURM_PLUGIN"

"$VENV/bin/python" - <<'EOF'
import snakemake, torch, transformers
import peagle
print(f"[setup] ok: peagle {peagle.__version__}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"transformers {transformers.__version__}, snakemake {snakemake.__version__}")
EOF
echo "$want" > "$STAMP"
say "done; run e.g. 'make test' or 'make table1'"
