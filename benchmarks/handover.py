"""Benchmark (issue 26): what the warm hand-over costs per ReLA step, for every method.

``--handover warm`` adds the method's heads and loss on the backbone's detached features to every ReLA
step (no backbone pass). This prints the ReLA step's training images/s with cold heads (``reference``) and
warm heads, ResNet-18 with the ImageNet stem at 32 px, batch 64, synthetic batches and targets (the
efficientnet-lite0 prior's 1,280-d features give d = 512), best of 3 timings of 5 steps after one warm-up
step, data loading excluded, and writes ``benchmarks/results/handover.json``.

Usage: ``python benchmarks/handover.py [METHOD ...]`` (default: every method; run it on an idle machine).
"""

from __future__ import annotations

import sys
import time

import torch
from _data import RESULTS, machine, write_json

from rela_convert.backbones import build_backbone
from rela_train.methods import METHODS, MethodSettings
from rela_train.setup import ReLAModel

BATCH_SIZE = 64
INPUT_SIZE = 32
TARGET_DIM = 512


def rela_images_per_s(method: str, handover: str, steps: int = 5) -> float:
    """Training images/s of the ReLA step (forward, backward, AdamW step, the method's bookkeeping) on the CPU."""
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone("resnet18", INPUT_SIZE, "imagenet")
    settings = MethodSettings(feature_dim, INPUT_SIZE, num_classes=10, total_steps=steps + 1)
    model = ReLAModel(METHODS.get(method)(backbone, settings), feature_dim, TARGET_DIM, "fixed", handover)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    images = torch.randn(BATCH_SIZE, 3, INPUT_SIZE, INPUT_SIZE)
    targets = torch.randn(BATCH_SIZE, TARGET_DIM)
    labels = torch.randint(0, 10, (BATCH_SIZE,))
    best = 0.0
    for _ in range(3):
        for step in range(steps + 1):
            if step == 1:
                started = time.perf_counter()
            loss, _ = model(images, images, targets, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.method.after_step(step)
        best = max(best, steps * BATCH_SIZE / (time.perf_counter() - started))
    return best


def main(methods: list[str]) -> None:
    results = {}
    print("| method | ReLA step, cold heads (images/s) | ReLA step, warm heads (images/s) | cost of warm heads |")
    print("| --- | --- | --- | --- |")
    for method in methods:
        cold, warm = rela_images_per_s(method, "reference"), rela_images_per_s(method, "warm")
        results[method] = {"reference_images_per_s": cold, "warm_images_per_s": warm}
        print(f"| {method} | {cold:.0f} | {warm:.0f} | {100 * (cold / warm - 1):+.1f}% step time |")
    write_json(RESULTS / "handover.json", {"machine": machine(), "batch_size": BATCH_SIZE, "methods": results})


if __name__ == "__main__":
    main(sys.argv[1:] or METHODS.names())
