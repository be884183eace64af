#!/usr/bin/env bash
# Create .venv and install tinygptv with its test and serving dependencies (CPU PyTorch).
# The CPU build of torch is installed first so that no CUDA build is pulled in; on a machine with a
# GPU, install the torch build you want before running this script (an installed torch is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,serve]"
