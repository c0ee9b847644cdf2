#!/usr/bin/env bash
# The paper's CIFAR-10 setting (method.md, stage 2; the options are in pipelines/cifar10.toml):
# ResNet-18 (CIFAR stem), BYOL, batch 128, AdamW lr 1e-3 / wd 0.01, 100 epochs at data ratio
# RATIO, ReLA adaptive, evaluated by kNN and the reference linear probe on the full
# 10,000-image test set. A GPU is assumed for the budget to be practical (--device auto).
#
# PRIOR defaults to the ImageNet EfficientNet-Lite0 (a fair prior for CIFAR-10). The
# shared CIFAR-10 ResNets (cifar-resnet:56:...) leak CIFAR-10 labels on this data.
# Environment (each overrides the config file): PRIOR, RATIO (default 0.1), EPOCHS (100),
# RELA_MODE (adaptive), OUT (runs/cifar10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RELA=.venv/bin/rela
CONFIG=pipelines/cifar10.toml
RATIO=${RATIO:-0.1}
MODE=${RELA_MODE:-adaptive}
OUT=${OUT:-runs/cifar10}
mkdir -p .cache "$OUT"
[ -d .cache/cifar10/test ] || tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C .cache
$RELA convert --config "$CONFIG" .cache/cifar10/train "$OUT/data" ${PRIOR:+--prior "$PRIOR"} --data-ratio "$RATIO"
$RELA train --config "$CONFIG" "$OUT/data" "$OUT/run-$MODE-r$RATIO" --rela "$MODE" ${EPOCHS:+--epochs "$EPOCHS"}
$RELA eval "$OUT/run-$MODE-r$RATIO" --train-dir .cache/cifar10/train --test-dir .cache/cifar10/test \
    --knn-k 200 --linear-probe-epochs 100 --json | tee "$OUT/eval-$MODE-r$RATIO.json"
