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

Usage: ``python benchmarks/methods.py speed [METHOD ...]`` (images/s; run it on an idle machine)
and ``python benchmarks/methods.py knn [EPOCHS] [METHOD ...]`` (the short studies; default 5 epochs,
every method). Both update ``benchmarks/results/methods.json`` and print the markdown table. Each
study is resumable: running again skips finished runs (``.cache/bench-methods/``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import torch
from _data import CACHE, RESULTS, cifar_subset, machine, write_json

from rela_convert.config import ConvertOptions
from rela_convert.convert import convert
from rela_convert.dataset.converted import ConvertedDataset
from rela_train.config import StudyOptions, TrainConfig
from rela_train.methods import METHODS
from rela_train.setup import resolve_config
from rela_train.study import run_study, synthetic_images_per_s

WORK = CACHE / "bench-methods"
PRIOR = "efficientnet-lite0"
BATCH_SIZE = 64


def images_per_s(method: str, stem: str, device: torch.device) -> float:
    """Training images/s of ``method``'s own step, ResNet-18 at 32 px with ``stem``, batch 64 (best of 2)."""
    config = TrainConfig(method=method, arch="resnet18", stem=stem, input_size=32, batch_size=BATCH_SIZE)
    config = replace(config, lr=1e-3, momentum=0.99)
    return max(synthetic_images_per_s(config, device, num_classes=10, steps=3) for _ in range(2))


def measure_speed(methods: list[str]) -> dict:
    """``{method: {"images_per_s_cifar_stem", "images_per_s_imagenet_stem"}}`` on the CPU."""
    device = torch.device("cpu")
    return {
        method: {
            "images_per_s_cifar_stem": images_per_s(method, "cifar", device),
            "images_per_s_imagenet_stem": images_per_s(method, "imagenet", device),
        }
        for method in methods
    }


def measure_knn(methods: list[str], epochs: int):
    """Yields ``(method, {"knn_untrained", "knn_without_rela", "knn_with_rela", ...})`` (kNN in percent)
    from one-seed studies at data ratio 1.0, one method after the other."""
    train, test = cifar_subset(2000, WORK / "train"), cifar_subset(1000, WORK / "test", "test")
    data = WORK / "data"
    convert(train, data, PRIOR, ConvertOptions(shard_size=500, formats=("hdf5",), progress=False))
    for method in methods:
        started = time.perf_counter()
        config = resolve_config(
            TrainConfig(
                method=method, arch="resnet18", stem="imagenet", batch_size=BATCH_SIZE, epochs=epochs, rela="adaptive"
            ),
            ConvertedDataset(data),
        )
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
        adaptive = next(record for record in records if record["rela"] == "adaptive")
        row = {
            "knn_untrained": knn["untrained"],
            "knn_without_rela": knn["off"],
            "knn_with_rela": knn["adaptive"],
            "switch_step": adaptive["switch_step"],
            "images_seen": adaptive["images_seen"],
            "epochs": epochs,
            "lr": config.lr,
            "momentum": config.momentum,
            "seconds": time.perf_counter() - started,
        }
        yield method, row


def main() -> None:
    mode, arguments = sys.argv[1], sys.argv[2:]
    out_file = RESULTS / "methods.json"
    saved = json.loads(out_file.read_text()) if out_file.is_file() else {"methods": {}}
    results = saved["methods"]

    def record(method: str, row: dict) -> None:
        results[method] = {**results.get(method, {}), **row}
        saved.update(machine=machine(), prior=PRIOR, batch_size=BATCH_SIZE, methods=results)
        write_json(out_file, saved)

    if mode == "speed":
        for method, row in measure_speed(arguments or METHODS.names()).items():
            record(method, row)
    elif mode == "knn":
        epochs = int(arguments[0]) if arguments else 5
        for method, row in measure_knn(arguments[1:] or METHODS.names(), epochs):
            record(method, row)
    else:
        raise SystemExit("usage: python benchmarks/methods.py speed|knn [...]")
    columns = (
        "images_per_s_cifar_stem",
        "images_per_s_imagenet_stem",
        "knn_untrained",
        "knn_without_rela",
        "knn_with_rela",
        "switch_step",
    )
    print("| method | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for method, row in results.items():
        cells = [
            f"{row[column]:.1f}" if isinstance(row.get(column), float) else str(row.get(column, "-"))
            for column in columns
        ]
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
