#!/usr/bin/env bash
# The paper's ImageNet-1K setting (method.md, stage 2; the options are in
# pipelines/imagenet1k.toml): ResNet-50, BYOL, batch 512, AdamW lr 1e-3 / wd 0.01,
# 100 epochs at data ratio RATIO (the paper reports 10%-50%), ReLA adaptive, bf16 on
# GPU; kNN and linear-probe evaluation on the validation set.
#
# Required environment: IMAGENET_TRAIN and IMAGENET_VAL, class-folder trees
# (<root>/<wnid>/<images>). Optional (each overrides the config file): PRIOR (default
# efficientnet-lite0; any spec of rela convert --help, e.g. torchvision:resnet18:/path/weights.pth),
# RATIO (0.5), EPOCHS (100), WORKERS (16), OUT (runs/imagenet1k).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${IMAGENET_TRAIN:?set IMAGENET_TRAIN to the ImageNet-1K train tree}"
: "${IMAGENET_VAL:?set IMAGENET_VAL to the ImageNet-1K validation tree (class folders)}"
bash scripts/setup.sh
RELA=.venv/bin/rela
CONFIG=pipelines/imagenet1k.toml
RATIO=${RATIO:-0.5}
OUT=${OUT:-runs/imagenet1k}
mkdir -p "$OUT"
$RELA convert --config "$CONFIG" "$IMAGENET_TRAIN" "$OUT/data" ${PRIOR:+--prior "$PRIOR"} \
    ${WORKERS:+--workers "$WORKERS"} --data-ratio "$RATIO"
$RELA train --config "$CONFIG" "$OUT/data" "$OUT/run-r$RATIO" ${EPOCHS:+--epochs "$EPOCHS"} \
    ${WORKERS:+--workers "$WORKERS"}
$RELA eval "$OUT/run-r$RATIO" --train-dir "$IMAGENET_TRAIN" --test-dir "$IMAGENET_VAL" \
    --knn-k 200 --linear-probe-epochs 100 --workers "${WORKERS:-16}" --json | tee "$OUT/eval-r$RATIO.json"
