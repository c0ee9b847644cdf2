#!/usr/bin/env bash
# The paper's ImageNet-1K setting (method.md, stage 2): ResNet-50, BYOL, batch 512,
# AdamW lr 1e-3 / wd 0.01, 100 epochs at data ratio RATIO (the paper reports 10%-50%),
# ReLA adaptive, bf16 on GPU; kNN and linear-probe evaluation on the validation set.
#
# Required environment: IMAGENET_TRAIN and IMAGENET_VAL, class-folder trees
# (<root>/<wnid>/<images>). Optional: PRIOR (default efficientnet-lite0; any spec of
# rela convert --help, e.g. torchvision:resnet18:/path/weights.pth), RATIO (0.5),
# EPOCHS (100), WORKERS (16), OUT (runs/imagenet1k).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${IMAGENET_TRAIN:?set IMAGENET_TRAIN to the ImageNet-1K train tree}"
: "${IMAGENET_VAL:?set IMAGENET_VAL to the ImageNet-1K validation tree (class folders)}"
bash scripts/setup.sh
RELA=.venv/bin/rela
PRIOR=${PRIOR:-efficientnet-lite0}
RATIO=${RATIO:-0.5}
EPOCHS=${EPOCHS:-100}
WORKERS=${WORKERS:-16}
OUT=${OUT:-runs/imagenet1k}
mkdir -p "$OUT"
$RELA convert "$IMAGENET_TRAIN" "$OUT/data" --prior "$PRIOR" --shard-size 5000 --batch-size 512 \
    --workers "$WORKERS" --data-ratio "$RATIO"
$RELA train "$OUT/data" "$OUT/run-r$RATIO" --arch resnet50 --method byol --rela adaptive \
    --epochs "$EPOCHS" --batch-size 512 --input-size 224 --workers "$WORKERS"
$RELA eval "$OUT/run-r$RATIO" --train-dir "$IMAGENET_TRAIN" --test-dir "$IMAGENET_VAL" \
    --knn-k 200 --linear-probe-epochs 100 --workers "$WORKERS" --json | tee "$OUT/eval-r$RATIO.json"
