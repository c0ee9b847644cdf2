#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv with the pinned
# PyTorch (constraints.txt) and rela installed in editable mode with the test,
# optional-prior, documentation and DALI (training views) extras. Idempotent: a second run only checks. pip's output
# goes to .venv-setup.log, printed only when the installation fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG=.venv-setup.log
echo "setting up .venv (torch 2.14.1, torchvision 0.29.1, NVIDIA DALI 2.4.0, rela; pip's output in $LOG) ..."
if ! {
    { [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv; } &&
    .venv/bin/python -m pip install --upgrade pip &&
    .venv/bin/python -m pip install -c constraints.txt -e ".[test,priors,docs,dali]"
} > "$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "error: setting up .venv failed (pip's output above, also in $LOG)" >&2
    exit 1
fi
.venv/bin/python -c "import torch, torchvision, nvidia.dali as dali; print(f'rela environment ready: torch {torch.__version__}, torchvision {torchvision.__version__}, DALI {dali.__version__}, CUDA available: {torch.cuda.is_available()}')"
