"""Benchmark 3 (issue 4): ``rela train``'s input pipeline, and ReLA versus BYOL step rates.

Part 1, input pipeline alone (read, decode, two ReLA views, collate), same
DataLoader workers and batch size:

- ``webdataset`` / ``hdf5``: :class:`rela_train.data.stream.TrainStream` over the tar
  or the HDF5 shards of one conversion (one epoch at data ratio 1.0), the exact
  stream ``rela train`` consumes;
- ``imagefolder``: torchvision ``ImageFolder`` on the raw tree with the same two
  ReLA views, shuffled.

on CIFAR-10 (``--cifar-images``, 32 px views) and on the ImageNet sample (500
full-size JPEGs, 224 px views), with a warm page cache (every file read just
before) and a cold one (every file's pages dropped with ``posix_fadvise``, the
case of a dataset larger than RAM). Throughput is the steady state: images after
the first batch over the time after the first batch, so worker start-up (a
fixed cost per epoch) is left out for every pipeline alike; best of
``--repeat`` interleaved runs. Goal: shards >= ImageFolder.

Part 2, training step rate of ResNet-18 (CIFAR stem, 32 px, batch 128) in the
ReLA phase (backbone on two views + transfer head) versus the BYOL phase (online
network, predictor and momentum network on two views), on in-memory tensors.

Usage: ``python benchmarks/loader.py [--workers 2] [--batch-size 128] [--repeat 2]
[--out benchmarks/results/loader.json]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _data import (
    CIFAR_PRIOR,
    IMAGENET_PRIOR,
    RESULTS,
    cifar_subset,
    evict_page_cache,
    imagenet_sample,
    list_images,
    machine,
    one_class_tree,
    synchronize,
    warm_page_cache,
    write_json,
)
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from rela_convert.backbones import build_backbone
from rela_convert.config import ConvertOptions
from rela_convert.convert import convert
from rela_convert.dataset.converted import ConvertedDataset
from rela_train.data.stream import TrainStream
from rela_train.methods import MethodSettings
from rela_train.methods.byol import BYOL
from rela_train.setup import ReLAModel
from rela_train.views import rela_view

PIPELINES = ("imagefolder", "webdataset", "hdf5")
CACHES = ("warm", "cold")


class TwoViews:
    """ImageFolder transform: the same two ReLA views the shard stream makes."""

    def __init__(self, input_size: int) -> None:
        self.view = rela_view(input_size)

    def __call__(self, image):
        return self.view(image), self.view(image)


def steady_images_per_second(loader: DataLoader) -> float:
    """Iterate the loader once; images/s after the first batch. The last batch element has
    one row per image in every pipeline (prior features, or ImageFolder labels)."""
    batches = iter(loader)
    next(batches)
    started, count = time.perf_counter(), 0
    for batch in batches:
        count += len(batch[-1])
    return count / (time.perf_counter() - started)


def input_pipeline(
    name: str,
    tree: Path,
    prior: str,
    input_size: int,
    shard_size: int,
    workers: int,
    batch_size: int,
    repeat: int,
    scratch: Path,
) -> dict:
    """ImageFolder versus the tar and the HDF5 shard stream on one dataset, warm and cold page cache."""
    data = scratch / f"{name}-data"
    convert(
        tree,
        data,
        prior,
        ConvertOptions(
            shard_size=shard_size, batch_size=64, workers=workers, formats=("webdataset", "hdf5"), progress=False
        ),
    )
    loaders, files = {}, {}
    for storage in ("webdataset", "hdf5"):
        dataset = ConvertedDataset(data, storage)
        stream = TrainStream(dataset, input_size, BYOL.views(input_size), data_ratio=1.0, seed=0, batch_size=batch_size)
        loaders[storage] = stream.loader(workers)
        files[storage] = [data / shard["name"] for shard in dataset.shards]
    loaders["imagefolder"] = DataLoader(
        ImageFolder(str(tree), transform=TwoViews(input_size)),
        batch_size=batch_size,
        num_workers=workers,
        shuffle=True,
        drop_last=True,
    )
    files["imagefolder"] = [path.resolve() for path in list_images(tree)]
    rates = {(cache, pipeline): 0.0 for cache in CACHES for pipeline in PIPELINES}
    for _ in range(repeat):
        for cache in CACHES:
            for pipeline in PIPELINES:
                (warm_page_cache if cache == "warm" else evict_page_cache)(files[pipeline])
                rates[cache, pipeline] = max(rates[cache, pipeline], steady_images_per_second(loaders[pipeline]))
    return {
        "dataset": name,
        "input_size": input_size,
        "images": len(files["imagefolder"]),
        "batch_size": batch_size,
        "images_per_s": {cache: {pipeline: rates[cache, pipeline] for pipeline in PIPELINES} for cache in CACHES},
        "ratio_over_imagefolder": {
            cache: {storage: rates[cache, storage] / rates[cache, "imagefolder"] for storage in ("webdataset", "hdf5")}
            for cache in CACHES
        },
    }


def step_rates(
    batch_size: int, steps: int, arch: str = "resnet18", size: int = 32, device: torch.device = torch.device("cpu")
) -> dict:
    """Optimiser steps/s of ``arch`` at ``size`` px in the ReLA and in the BYOL phase, on random tensors already on
    ``device`` (bf16 autocast on CUDA, as ``rela train``): the compute ceiling, no input pipeline."""
    torch.manual_seed(0)
    backbone, feature_dim = build_backbone(arch, size)
    model = ReLAModel(BYOL(backbone, MethodSettings(feature_dim, size)), feature_dim, 64).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    labels = torch.zeros(batch_size, dtype=torch.int64, device=device)
    view_1, view_2, targets = (
        torch.randn(batch_size, 3, size, size, device=device),
        torch.randn(batch_size, 3, size, size, device=device),
        torch.randn(batch_size, 64, device=device),
    )
    rates = {}
    for phase, phase_targets in (("rela", targets), ("byol", None)):
        for index in range(steps + 1):
            if index == 1:  # the first step warms up allocations
                synchronize(device)
                started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _ = model(view_1, view_2, phase_targets, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.method.after_step(index)
        synchronize(device)
        rates[phase] = steps / (time.perf_counter() - started)
    return {
        "arch": arch,
        "input_size": size,
        "batch_size": batch_size,
        "steps": steps,
        "rela_steps_per_s": rates["rela"],
        "byol_steps_per_s": rates["byol"],
        "rela_images_per_s": rates["rela"] * batch_size,
        "byol_images_per_s": rates["byol"] * batch_size,
        "ratio_rela_over_byol": rates["rela"] / rates["byol"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for every pipeline")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=128,
        help="images per batch (CIFAR-10 and training steps; the ImageNet sample uses at most 32)",
    )
    parser.add_argument(
        "--cifar-images", type=int, default=5000, help="CIFAR-10 train images in the input-pipeline test"
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="interleaved runs per pipeline and cache state; the best counts"
    )
    parser.add_argument("--steps", type=int, default=5, help="timed optimiser steps per phase")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader.json", help="JSON output path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        cifar_tree = cifar_subset(args.cifar_images, scratch / "cifar-tree")
        imagenet_tree = one_class_tree(imagenet_sample(), scratch / "imagenet-tree")
        pipelines = [
            input_pipeline(
                "cifar10",
                cifar_tree,
                CIFAR_PRIOR,
                32,
                max(1, args.cifar_images // 8),
                args.workers,
                args.batch_size,
                args.repeat,
                scratch,
            ),
            input_pipeline(
                "imagenet-sample",
                imagenet_tree,
                IMAGENET_PRIOR,
                224,
                63,
                args.workers,
                min(args.batch_size, 32),
                args.repeat,
                scratch,
            ),
        ]
    steps = step_rates(args.batch_size, args.steps)
    print(
        f"input pipeline (read + decode + two ReLA views + collate), images/s after the first batch, {args.workers} "
        "workers:"
    )
    print(
        f"  {'dataset':16s} {'size':>5s} {'cache':>5s} {'ImageFolder':>12s} {'webdataset':>11s} {'hdf5':>8s} "
        f"{'wds/IF':>7s} {'hdf5/IF':>8s}"
    )
    for row in pipelines:
        for cache in CACHES:
            rate, ratio = row["images_per_s"][cache], row["ratio_over_imagefolder"][cache]
            print(
                f"  {row['dataset']:16s} {row['input_size']:5d} {cache:>5s} {rate['imagefolder']:12.1f} "
                f"{rate['webdataset']:11.1f} {rate['hdf5']:8.1f} {ratio['webdataset']:7.2f} {ratio['hdf5']:8.2f}"
            )
    print(
        f"training steps, ResNet-18 at 32 px, batch {args.batch_size}: ReLA {steps['rela_images_per_s']:.1f} img/s, "
        f"BYOL {steps['byol_images_per_s']:.1f} img/s, ReLA/BYOL {steps['ratio_rela_over_byol']:.2f}"
    )
    write_json(
        args.out,
        {
            "machine": machine(),
            "workers": args.workers,
            "repeat": args.repeat,
            "input_pipeline": pipelines,
            "training_steps": steps,
        },
    )


if __name__ == "__main__":
    main()
