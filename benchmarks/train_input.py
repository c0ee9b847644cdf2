"""Benchmark: `rela train`'s views on the CPU (`--augment cpu`) versus on the training device (`--augment device`).

Part 1, views alone, on real pictures (CIFAR-10 at 32 px, the 500-image ImageNet sample at 224 px), for the
ReLA views and BYOL's own views (blur and solarisation at 224 px):

- ``cpu``: what a DataLoader worker does per image with ``--augment cpu``: decode (``decode_rgb``) and make
  two views (``ViewParams.cpu``), one process, one torch thread: images/s per core;
- ``decode``: what a worker does per image with ``--augment device``: ``decode_for_device`` (decode, shrink to
  at most 2 S px): images/s per core;
- ``device``: :class:`rela_train.device_views.DeviceViews` on whole decoded batches (``--batch-size``) on
  ``--device`` (without a GPU: the device path on CPU tensors, with torch's threads): images/s.

Part 2, training images/s of ResNet-18 at 32 px (CIFAR stem, CIFAR-10 pictures) and ResNet-50 at 224 px
(ImageNet sample) in the ReLA phase (backbone on two views, fixed transfer head; bf16 autocast on CUDA, as
``rela train``), the batches coming from a DataLoader with ``--workers`` processes that make the views
(``cpu``) or only decode (``device``, then views on the device before each step), pinned memory on CUDA.
Images/s over ``--steps`` steps after a first (warm-up) one.

Usage: ``python benchmarks/train_input.py [--device auto] [--workers 2] [--cifar-images 256]
[--imagenet-images 64] [--batch-size 32] [--train-batch-32 32] [--train-batch-224 8] [--steps 2]
[--out benchmarks/results/train_input.json]``. The defaults take about two minutes on 2 CPU cores; on a GPU
machine raise the counts (e.g. ``--imagenet-images 500 --batch-size 256 --train-batch-224 256 --steps 10
--workers 8``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _data import RESULTS, cifar_root, imagenet_sample, machine, synchronize, write_json
from torch.utils.data import DataLoader, IterableDataset

from rela_convert.backbones import build_backbone
from rela_convert.devices import resolve_device
from rela_convert.images import decode_rgb
from rela_train.device_views import DeviceViews, decode_for_device, decode_size, stack_decoded, step_seed
from rela_train.methods import MethodSettings
from rela_train.methods.byol import BYOL, byol_view_params
from rela_train.setup import ReLAModel
from rela_train.views import rela_params

#: Target dimension of the ReLA targets in the training part (random targets: speed does not depend on them).
TARGET_DIM = 64


def pictures(kind: str, count: int) -> list[bytes]:
    """Encoded bytes of ``count`` real pictures: CIFAR-10 train images (across the classes) or ImageNet ones."""
    if kind == "cifar":
        folders = sorted((cifar_root() / "train").iterdir())
        per_class = -(-count // len(folders))
        files = [path for folder in folders for path in sorted(folder.iterdir())[:per_class]][:count]
    else:
        files = sorted(imagenet_sample().iterdir())[:count]
    return [path.read_bytes() for path in files]


def views_alone(kind: str, size: int, encoded: list[bytes], batch_size: int, device: torch.device) -> dict:
    """Part 1 on one set of pictures: images/s of CPU views per core, of worker decoding per core, of device views."""
    threads = torch.get_num_threads()
    result = {"dataset": kind, "input_size": size, "images": len(encoded), "batch_size": batch_size, "views": {}}
    torch.set_num_threads(1)
    started = time.perf_counter()
    decoded = [decode_for_device(data, decode_size(size)) for data in encoded]
    result["decode_images_per_s_per_core"] = len(encoded) / (time.perf_counter() - started)
    pairs = {"rela": (rela_params(size),) * 2, "byol": byol_view_params(size)}
    for name, params in pairs.items():
        views = [params[0].cpu(), params[1].cpu()]
        torch.set_num_threads(1)
        started = time.perf_counter()
        for data in encoded:
            picture = decode_rgb(data)
            views[0](picture), views[1](picture)
        cpu_rate = len(encoded) / (time.perf_counter() - started)
        torch.set_num_threads(threads)
        device_views = DeviceViews(params, params, device)
        batches = [stack_decoded(decoded[i : i + batch_size]) for i in range(0, len(decoded), batch_size)]
        device_views(*batches[0], True, 0)  # warm-up (kernels, allocator)
        synchronize(device)
        started = time.perf_counter()
        for step, (pixels, sizes) in enumerate(batches):
            device_views(pixels, sizes, True, step_seed(0, 0, step, 0))
        synchronize(device)
        result["views"][name] = {
            "cpu_images_per_s_per_core": cpu_rate,
            "device_images_per_s": len(encoded) / (time.perf_counter() - started),
        }
    torch.set_num_threads(threads)
    return result


class Batches(IterableDataset):
    """Endless batches of ``batch_size`` pictures: two ReLA views (``cpu``) or the decoded batch (``device``)."""

    def __init__(self, encoded: list[bytes], size: int, batch_size: int, augment: str) -> None:
        self.encoded, self.size, self.batch_size, self.augment = encoded, size, batch_size, augment

    def __iter__(self):
        view = rela_params(self.size).cpu()
        worker = torch.utils.data.get_worker_info()
        index = worker.id * self.batch_size if worker else 0
        while True:
            chunk = [self.encoded[(index + i) % len(self.encoded)] for i in range(self.batch_size)]
            index += self.batch_size * (worker.num_workers if worker else 1)
            if self.augment == "device":
                yield stack_decoded([decode_for_device(data, decode_size(self.size)) for data in chunk])
            else:
                decoded = [decode_rgb(data) for data in chunk]
                yield torch.stack([view(picture) for picture in decoded]), torch.stack([view(p) for p in decoded])


def training(arch: str, size: int, encoded: list[bytes], batch_size: int, steps: int, workers: int, device) -> dict:
    """Part 2 for one network: training images/s with CPU views and with device views."""
    result = {"arch": arch, "input_size": size, "batch_size": batch_size, "steps": steps, "images_per_s": {}}
    for augment in ("cpu", "device"):
        torch.manual_seed(0)
        backbone, feature_dim = build_backbone(arch, size)
        model = ReLAModel(BYOL(backbone, MethodSettings(feature_dim, size)), feature_dim, TARGET_DIM).to(device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        device_views = DeviceViews((rela_params(size),) * 2, (rela_params(size),) * 2, device)
        targets = torch.randn(batch_size, TARGET_DIM, device=device)
        labels = torch.zeros(batch_size, dtype=torch.int64, device=device)
        loader = DataLoader(
            Batches(encoded, size, batch_size, augment),
            batch_size=None,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=2 if workers else None,
        )
        batches = iter(loader)
        for step in range(steps + 1):
            if step == 1:
                synchronize(device)
                started = time.perf_counter()
            first, second = next(batches)
            if augment == "device":
                view_1, view_2 = device_views(first, second, True, step_seed(0, 0, step, 0))
            else:
                view_1, view_2 = first.to(device, non_blocking=True), second.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss, _ = model(view_1, view_2, targets, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        synchronize(device)
        result["images_per_s"][augment] = steps * batch_size / (time.perf_counter() - started)
        del batches
    result["device_over_cpu"] = result["images_per_s"]["device"] / result["images_per_s"]["cpu"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers in the training part")
    parser.add_argument("--cifar-images", type=int, default=256, help="CIFAR-10 pictures (views part)")
    parser.add_argument("--imagenet-images", type=int, default=64, help="ImageNet sample pictures (at most 500)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per device-views batch (views part)")
    parser.add_argument("--train-batch-32", type=int, default=32, help="batch of the ResNet-18 32 px training part")
    parser.add_argument("--train-batch-224", type=int, default=8, help="batch of the ResNet-50 224 px training part")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per network and augment mode")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_input.json", help="JSON output path")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cifar = pictures("cifar", args.cifar_images)
    imagenet = pictures("imagenet", args.imagenet_images)
    views = [
        views_alone("cifar10", 32, cifar, args.batch_size, device),
        views_alone("imagenet-sample", 224, imagenet, args.batch_size, device),
    ]
    print(f"views alone (two views per image), images/s; device views on {device} ({torch.get_num_threads()} threads):")
    print(f"  {'dataset':16s} {'size':>4s} {'views':>5s} {'cpu/core':>9s} {'decode/core':>12s} {'device':>9s}")
    for row in views:
        for name, rates in row["views"].items():
            print(
                f"  {row['dataset']:16s} {row['input_size']:4d} {name:>5s} {rates['cpu_images_per_s_per_core']:9.1f} "
                f"{row['decode_images_per_s_per_core']:12.1f} {rates['device_images_per_s']:9.1f}"
            )
    trained = [
        training("resnet18", 32, cifar, args.train_batch_32, args.steps, args.workers, device),
        training("resnet50", 224, imagenet, args.train_batch_224, args.steps, args.workers, device),
    ]
    print(f"training (ReLA phase), images/s on {device}, {args.workers} workers:")
    print(f"  {'network':9s} {'size':>4s} {'batch':>5s} {'--augment cpu':>14s} {'--augment device':>17s} {'ratio':>6s}")
    for row in trained:
        rates = row["images_per_s"]
        print(
            f"  {row['arch']:9s} {row['input_size']:4d} {row['batch_size']:5d} {rates['cpu']:14.1f} "
            f"{rates['device']:17.1f} {row['device_over_cpu']:6.2f}"
        )
    write_json(
        args.out,
        {
            "machine": machine(),
            "device": str(device),
            "workers": args.workers,
            "steps": args.steps,
            "views": views,
            "training": trained,
        },
    )


if __name__ == "__main__":
    main()
