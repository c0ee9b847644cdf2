#!/usr/bin/env bash
# Clusters and many runs: docs/cluster.md explains this script, its figures and how to adapt it.
#SBATCH --job-name=rela-imagenet1k
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#
# pipelines/imagenet1k.sh on a SLURM cluster: the paper's ImageNet-1K setting (pipelines/imagenet1k.toml),
# `rela convert` and `rela train` on every node of the job with torch.distributed's own launcher (torchrun,
# c10d rendezvous on the job's first node), then `rela eval` on the first node. Submit from the repository
# root, after `bash scripts/setup.sh` there, on a file system every node sees:
#
#   IMAGENET_TRAIN=/data/imagenet/train IMAGENET_VAL=/data/imagenet/val sbatch pipelines/imagenet1k-slurm.sh
#
# OUT (the dataset and the run) must be on a shared file system. sbatch passes the environment on. Optional,
# as in pipelines/imagenet1k.sh: PRIOR, RATIO (0.5), EPOCHS, WORKERS, OUT (runs/imagenet1k); also CONFIG
# (pipelines/imagenet1k.toml), GPUS_PER_NODE (processes per node: SLURM_GPUS_ON_NODE, else 1), RDZV_PORT
# (29500), PYTHON (.venv/bin/python), KNN_K (200), PROBE_EPOCHS (100; 0: kNN only), IMAGENET_VAL unset: no eval.
# The same submission again resumes: a finished conversion is kept, the training goes on from its checkpoint.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
: "${IMAGENET_TRAIN:?set IMAGENET_TRAIN to the ImageNet-1K train tree}"
: "${SLURM_JOB_NODELIST:?run this script with sbatch (or inside a SLURM allocation)}"
export PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-pipelines/imagenet1k.toml}
RATIO=${RATIO:-0.5}
OUT=${OUT:-runs/imagenet1k}
# torchrun's arguments, the same on every node; srun gives each node its SLURM_NODEID (used as --node-rank).
export NODES=${SLURM_JOB_NUM_NODES:-$SLURM_NNODES}
export PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # the first node hosts the rendezvous
export RDZV_HOST
export RDZV_PORT=${RDZV_PORT:-29500}
export RDZV_JOB=${SLURM_JOB_ID:-rela}
mkdir -p "$OUT"

# on_every_node STAGE ARGS...: `rela ARGS` as torchrun's processes on every node (one srun task per node).
on_every_node() {
    local stage=$1
    shift
    # srun does not pass sbatch's --cpus-per-task on to its tasks (SLURM >= 22.05): given again.
    STAGE=$stage srun --nodes="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} bash -c '
        exec "$PYTHON" -m torch.distributed.run --nnodes "$NODES" --nproc-per-node "$PER_NODE" \
            --node-rank "$SLURM_NODEID" --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" \
            --rdzv-id "$RDZV_JOB-$STAGE" --max-restarts 0 -m cli "$@"' rela "$@"
}

on_every_node convert convert --config "$CONFIG" "$IMAGENET_TRAIN" "$OUT/data" ${PRIOR:+--prior "$PRIOR"} \
    ${WORKERS:+--workers "$WORKERS"} --data-ratio "$RATIO"
on_every_node train train --config "$CONFIG" "$OUT/data" "$OUT/run-r$RATIO" ${EPOCHS:+--epochs "$EPOCHS"} \
    ${WORKERS:+--workers "$WORKERS"}
if [ -n "${IMAGENET_VAL:-}" ]; then
    "$PYTHON" -m cli eval "$OUT/run-r$RATIO" --train-dir "$IMAGENET_TRAIN" --test-dir "$IMAGENET_VAL" \
        --knn-k "${KNN_K:-200}" --linear-probe-epochs "${PROBE_EPOCHS:-100}" --workers "${WORKERS:-16}" --json \
        --quiet | tee "$OUT/eval-r$RATIO.json"
fi
