#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with the pinned
# PyTorch (constraints.txt) and rela installed in editable mode with the test
# and optional-prior extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,priors]"
.venv/bin/python -c "import torch, torchvision; print(f'rela environment ready: torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA available: {torch.cuda.is_available()}')"
