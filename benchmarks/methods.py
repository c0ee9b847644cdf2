"""Benchmark (issue 10): every registered training method, with and without ReLA, on real CIFAR-10.

For each method of ``rela_train.methods.METHODS`` this prints and records:

- training images/s of the method's own step on a CPU (or the device), ResNet-18 at 32 px with the
  reference's CIFAR stem and with the ImageNet stem, on synthetic batches of 64 after one warm-up
  step (``rela_train.study.synthetic_images_per_s``; data loading excluded);
- kNN top-1 (k = 200, all train images as memory) after the same short budget with and without
  ReLA: a one-seed ``rela study`` with ``--ratios 1.0`` (the ReLA arm trains on as many images as
  the baseline) on 2,000 real CIFAR-10 train images converted with the ImageNet EfficientNet-Lite0
  prior, 1,000 test images, ResNet-18 with the ImageNet stem at 32 px, batch 64, EPOCHS epochs,
  plus the untrained network.

Usage: ``python benchmarks/methods.py [EPOCHS] [METHOD ...]`` (default 5 epochs, every method).
Results: ``benchmarks/results/methods.json`` (updated after every method) and a markdown table on
stdout. Each study is resumable: running again skips finished runs (``.cache/bench-methods/``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import torch
from _data import CACHE, RESULTS, cifar_subset, machine, write_json

from rela_convert.convert import ConvertOptions, convert
from rela_train.data import ConvertedDataset
from rela_train.methods import METHODS
from rela_train.study import StudyOptions, run_study, synthetic_images_per_s
from rela_train.trainer import TrainConfig

WORK = CACHE / "bench-methods"
PRIOR = "efficientnet-lite0"
BATCH_SIZE = 64


def images_per_s(method: str, stem: str, device: torch.device) -> float:
    """Training images/s of ``method``'s own step, ResNet-18 at 32 px with ``stem``, batch 64 (best of 2)."""
    config = TrainConfig(method=method, arch="resnet18", stem=stem, input_size=32, batch_size=BATCH_SIZE)
    config = replace(config, lr=1e-3, momentum=0.99)
    return max(synthetic_images_per_s(config, device, steps=3) for _ in range(2))


def main() -> None:
    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    methods = sys.argv[2:] or METHODS.names()
    train, test = cifar_subset(2000, WORK / "train"), cifar_subset(1000, WORK / "test", "test")
    data = WORK / "data"
    convert(train, data, PRIOR, ConvertOptions(shard_size=500, formats=("hdf5",), progress=False))
    out_file = RESULTS / "methods.json"
    results = json.loads(out_file.read_text())["methods"] if out_file.is_file() else {}
    device = torch.device("cpu")
    for method in methods:
        started = time.perf_counter()
        config = TrainConfig(
            method=method, arch="resnet18", stem="imagenet", batch_size=BATCH_SIZE, epochs=epochs, rela="adaptive"
        ).resolved(ConvertedDataset(data))
        records = run_study(
            data,
            WORK / f"study-{method}-e{epochs}",
            train,
            test,
            config,
            StudyOptions(ratios=(1.0,), seeds=(0,)),
            echo=lambda line: print(f"  {method}: {line}", flush=True),
        )
        knn = {record["rela"]: 100 * record["knn_top1"] for record in records}
        results[method] = {
            "images_per_s_cifar_stem": images_per_s(method, "cifar", device),
            "images_per_s_imagenet_stem": images_per_s(method, "imagenet", device),
            "knn_untrained": knn["untrained"],
            "knn_without_rela": knn["off"],
            "knn_with_rela": knn["adaptive"],
            "switch_step": next(record["switch_step"] for record in records if record["rela"] == "adaptive"),
            "images_seen": next(record["images_seen"] for record in records if record["rela"] == "off"),
            "epochs": epochs,
            "lr": config.lr,
            "momentum": config.momentum,
            "seconds": time.perf_counter() - started,
        }
        write_json(out_file, {"machine": machine(), "prior": PRIOR, "batch_size": BATCH_SIZE, "methods": results})
    print(
        "| method | images/s, CIFAR stem | images/s, ImageNet stem | kNN untrained | kNN without ReLA | kNN with ReLA |"
    )
    print("|---|---|---|---|---|---|")
    for method, row in results.items():
        print(
            f"| {method} | {row['images_per_s_cifar_stem']:.1f} | {row['images_per_s_imagenet_stem']:.1f} | "
            f"{row['knn_untrained']:.2f} | {row['knn_without_rela']:.2f} | {row['knn_with_rela']:.2f} |"
        )


if __name__ == "__main__":
    main()
