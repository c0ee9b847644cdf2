#!/usr/bin/env bash
# The GPU check (issue 20): the one command to run on a lent GPU machine; what it measures is in check.py beside it.
#
# Here first:   bash benchmarks/gpu/prepare.sh        (wheels + data into the ignored .gpu/, prints what travels)
# Device tool:  run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"], timeout_s=570)
# Figures:      $OUT/gpu-{tests,convert,train,cifar,summary}.json and gpu-log.txt; keep them as
#               benchmarks/results/gpu-*.json and quote them in docs/gpu.md.
#
# The device's Python has its own torch (2.11) and no package index: the carried wheels are installed with
# --no-deps into a fresh --target folder put on PYTHONPATH, with the project itself (not installed) beside it.
# --dry-run [check.py options]: the same parts at toy sizes on the CPU (CI runs it: tests/test_gpu_check.py).
# PYTHON (default python3) is the interpreter; OUT (default: a new temporary folder) receives the figures.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
MODE=()
if [[ ${1:-} == --dry-run ]]; then
    MODE=(--dry-run "${@:2}")
fi
export PYTHONPATH=$PWD
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    SITE=$(mktemp -d)/site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu/wheels/*.whl \
        || { echo "gpu check: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=$SITE:$PYTHONPATH
fi
if [[ -d .gpu/shared ]]; then
    export RELA_SHARED=$PWD/.gpu/shared
fi
export PYTHONUNBUFFERED=1
echo "gpu check: $("$PYTHON" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision",
    torchvision.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name())'), OUT=$OUT"
"$PYTHON" benchmarks/gpu/check.py --out "$OUT" "${MODE[@]}" 2>&1 | tee "$OUT/gpu-log.txt"
