#!/usr/bin/env bash
# Issue 26's long-budget setting: where the reference's plateau rule fires on this 2-core CPU, what does the
# hand-over cost, and does the guarded rule (the default) end at least level with the better of ReLA alone and
# the method alone? One `rela study` per comparison, results copied to $RESULTS/study-<name>/.
#
# Setting (every arm): 1,000 CIFAR-10 train images (100 per class), efficientnet-lite0 prior, SimCLR, ResNet-18
# with the ImageNet stem at 32 px (the cheapest network whose SimCLR baseline learns here), batch 32, 50 epochs
# (1,550 steps: the ReLA loss plateaus and the reference rule fires within them), AdamW lr 1e-3 constant; online
# kNN monitor on 1,000 train / 500 test images every 62 steps (2 epochs; also the guarded rule's trial length);
# final kNN with the 1,000 train images as memory and 1,000 test images as queries.
#
# The reference's plateau rule never fired in this setting (nor at lr 5e-4 or 3e-4 over 1,860 steps: rho peaked at
# 0.992-0.993 around step 700, then the ReLA loss fell again), so the hand-over is forced halfway, as static:0.5
# does, to measure how each way of handing over behaves. Studies (each trains only its own arms; the baseline,
# --rela off, is the default study's, linked):
# - default: the default rule (guarded, warm heads) - here it never proposes, so it is ReLA alone - and
#   guarded:0.5, the guarded rule proposing from epoch 25 on;
# - static, static-warm, static-warm-ramp: the hand-over forced at epoch 25 (static:0.5) with cold heads (the
#   reference), with warm heads, and with warm heads and a 62-step learning-rate ramp: how to hand over;
# - adaptive: the reference rule with cold heads (never fires here: the same network as ReLA alone);
# - supervised: a method that does pass ReLA alone (cross-entropy on the labels the conversion stored): the method
#   alone and guarded:0.5, to see the guarded rule keep a trial (its own baseline: another method).
#
# Long: run it in the background; every run is a resumable RUN folder under $WORK, so running it again continues
#     mkdir -p .cache && nohup bash experiments/handover_study.sh > .cache/handover.log 2>&1 &
set -euo pipefail
# The whole script is one function, parsed before it runs: editing this file during a run is safe.
main() {
    cd "$(dirname "$0")/.."
    RELA=.venv/bin/rela
    WORK=${WORK:-.cache/lb}  # the data; the studies go to $WORK/e50
    RESULTS=${RESULTS:-experiments/results/handover}
    SEEDS=${SEEDS:-0}
    ONLY=${ONLY:-}  # one study's name: run only that one (to run two at once on two cores)
    export OMP_WAIT_POLICY=PASSIVE  # no spinning OpenMP threads while the DataLoader workers decode

    .venv/bin/python benchmarks/_data.py train 1000 "$WORK/train1k"
    .venv/bin/python benchmarks/_data.py train 1000 "$WORK/mon-train"
    .venv/bin/python benchmarks/_data.py test 1000 "$WORK/test1k"
    .venv/bin/python benchmarks/_data.py test 500 "$WORK/mon-test"
    [ -f "$WORK/data/index.json" ] ||
        $RELA convert "$WORK/train1k" "$WORK/data" --prior efficientnet-lite0 --format hdf5 --shard-size 1000 --quiet

    COMMON=(--train-dir "$WORK/train1k" --test-dir "$WORK/test1k" --method simclr --stem imagenet --epochs 50
            --batch-size 32 --ratios 1 --seeds "$SEEDS" --subsets random
            --monitor-train "$WORK/mon-train" --monitor-test "$WORK/mon-test" --monitor-every 62)

    study() {  # name [options]; the other studies link the default study's baselines
        local name=$1
        shift
        [ -n "$ONLY" ] && [ "$ONLY" != "$name" ] && return
        local folder=$WORK/e50/study-$name
        mkdir -p "$folder/runs"
        if [ "$name" != default ] && [ "$name" != supervised ]; then
            for seed in ${SEEDS//,/ }; do
                ln -sfn "../../study-default/runs/seed$seed-baseline" "$folder/runs/seed$seed-baseline"
            done
        fi
        echo "== $(date -u +%H:%M:%S) study $name"
        $RELA study "$WORK/data" "$folder" "${COMMON[@]}" "$@"
        mkdir -p "$RESULTS/study-$name"
        cp "$folder/results.md" "$folder/results.json" "$folder/curve.png" "$RESULTS/study-$name/"
    }

    study default --rules guarded,guarded:0.5
    study static --rules static:0.5 --handover reference
    study static-warm --rules static:0.5 --handover warm
    study static-warm-ramp --rules static:0.5 --handover warm --handover-ramp 62
    study adaptive --rules adaptive --handover reference
    study supervised --rules guarded:0.5 --method supervised
    [ -n "$ONLY" ] || .venv/bin/python experiments/handover_report.py "$RESULTS" \
        "$WORK"/e50/study-{default,static,static-warm,static-warm-ramp,adaptive}/  # SimCLR's; supervised apart
}
main "$@"
exit
