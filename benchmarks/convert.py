"""Benchmark 1 (issue 4): ``rela convert`` against its floor and against the reference approach.

For two inputs, in one run, with the same workers and batch size:

- ``imagenet``: the shared 500-image ImageNet sample (full-size JPEGs, one flat
  folder) with a 224 px MobileNetV3-Small-sized prior (``rand:mobilenet_v3_small@224``);
- ``cifar``: the first ``--limit`` CIFAR-10 train images (32 px JPEGs, class
  folders) with the 32 px CIFAR ResNet-20 prior (64-d).

it measures, in images/s:

(a) ``decode``: read + decode + resize + centre-crop only, with the converter's own
    function (:func:`rela_convert.images.prior_pixels`) through a DataLoader
    with the same workers (the CPU decoding floor);
(b) ``prior``: the prior's forward pass alone (:meth:`Prior.features`, as the
    converter calls it) on the tensors (a) produced, batch by batch;
(c) ``convert``: :func:`rela_convert.convert.convert` end to end (listing, prior
    loading, shards, PCA statistics, index), progress bar off, into a temporary folder;
(d) ``reference``: torchvision ``ImageFolder`` + PIL + ``Resize`` / ``CenterCrop`` /
    ``ToTensor`` / ``Normalize`` + DataLoader, the same prior module, features
    gathered in memory, then one ``torch.save``.

and the ratios ``c / floor`` and ``c / d``, where ``floor = 1 / (1/a + 1/b)`` when
the prior runs on the CPU (decoding and the prior share the same cores) and
``min(a, b)`` when it runs on a GPU. Every variant runs ``--repeat`` times,
interleaved, and the best run counts (the machine is shared; the JSON keeps every run).

Usage, from the project root::

    python benchmarks/convert.py [--workers 2] [--batch-size 256] [--device auto]
                                 [--limit 5000] [--repeat 3] [--out benchmarks/results/convert.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _data import (
    CIFAR_PRIOR,
    IMAGENET_PRIOR,
    RESULTS,
    Clock,
    cifar_subset,
    imagenet_sample,
    list_images,
    machine,
    one_class_tree,
    synchronize,
    warm_page_cache,
    write_json,
)
from torch.utils.data import DataLoader, Dataset


@dataclass
class Case:
    """One input of the benchmark."""

    name: str
    source: Path  # what ``rela convert`` reads
    folder_tree: Path  # the same images in ImageFolder's layout (class folders)
    prior: str
    files: list[Path]


class DecodeOnly(Dataset):
    """(a): the converter's decode + resize + centre crop of every file, nothing else."""

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, position: int) -> torch.Tensor:
        from rela_convert.images import prior_pixels

        with open(self.files[position], "rb") as handle:
            return prior_pixels(handle.read(), self.size)


def measure_decode(case: Case, input_size: int, args) -> tuple[Clock, list[torch.Tensor]]:
    """(a) Time to decode every file through the DataLoader (worker start included), and the batches."""
    with Clock() as clock:
        loader = DataLoader(
            DecodeOnly(case.files, input_size),
            batch_size=args.batch_size,
            num_workers=args.workers,
            prefetch_factor=4 if args.workers else None,
        )
        batches = list(loader)
        del loader  # workers exit and are reaped inside the block, so their CPU time is counted
    return clock, batches


def measure_prior(prior, batches: list[torch.Tensor], device: torch.device) -> Clock:
    """(b) Seconds of the prior's forward pass over pre-decoded uint8 batches, as the converter runs it
    (channels-last + bf16 autocast on CUDA, plain float32 on the CPU); one warm-up batch first."""
    cuda = device.type == "cuda"

    def forward(batch: torch.Tensor) -> np.ndarray:
        pixels = batch.to(device, non_blocking=True)
        if cuda:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return prior.features(pixels).cpu().numpy()

    forward(batches[0])
    synchronize(device)
    with Clock() as clock:
        for batch in batches:
            forward(batch)
        synchronize(device)
    return clock


def cpu_chunk(input_size: int) -> int:
    """Images per forward pass that keep a CPU forward cache-friendly: 8 at 224 px, scaled by
    pixels, at most 64 (measured on this machine, one thread: MobileNetV3-Small at 224 px costs
    3.2 ms/image in passes of 8 and 11.3 ms/image in passes of 128; ResNet-20 at 32 px 0.99 in
    passes of 64 and 1.46 in passes of 256)."""
    return min(64, max(1, round(8 * (224 / input_size) ** 2)))


class _ForwardInWorker(Dataset):
    """Item ``i``: the prior's features of pre-decoded batch ``i``, computed in a DataLoader
    worker (one thread each) in passes of :func:`cpu_chunk` images."""

    def __init__(self, prior, batches: list[torch.Tensor]) -> None:
        self.prior, self.batches = prior, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, position: int) -> torch.Tensor:
        chunk = cpu_chunk(self.prior.input_size)
        return torch.cat([self.prior.features(part) for part in self.batches[position].split(chunk)])


def measure_prior_best(prior, batches: list[torch.Tensor], args) -> Clock:
    """(b*) Seconds of the prior alone laid out the best way found for the CPU: in ``--workers``
    single-threaded processes (no thread oversubscription), in passes of :func:`cpu_chunk` images."""
    loader = DataLoader(
        _ForwardInWorker(prior, batches),
        batch_size=None,
        num_workers=args.workers,
        prefetch_factor=2 if args.workers else None,
    )
    with Clock() as clock:
        for _ in loader:
            pass
        del loader
    return clock


def measure_convert(case: Case, args, scratch: Path) -> tuple[Clock, dict, Path]:
    """(c) Seconds of one ``convert`` call end to end into a fresh folder, its result, and the folder."""
    from rela_convert.config import ConvertOptions
    from rela_convert.convert import convert

    out = Path(tempfile.mkdtemp(prefix=f"convert-{case.name}-", dir=scratch))
    options = ConvertOptions(
        batch_size=args.batch_size, workers=args.workers, device=args.device, decode=args.decode, progress=False
    )
    with Clock() as clock:
        result = convert(case.source, out, case.prior, options)
    return clock, result, out


def measure_reference(case: Case, args, device: torch.device, scratch: Path) -> tuple[Clock, torch.Tensor]:
    """(d) Seconds of the reference approach end to end, and the features it saved."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from rela_convert.priors import load_prior

    out = Path(tempfile.mkdtemp(prefix=f"reference-{case.name}-", dir=scratch))
    with Clock() as clock:
        prior = load_prior(case.prior)
        size = prior.input_size
        transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(prior.mean, prior.std)])
        dataset = ImageFolder(str(case.folder_tree), transform=transform)
        loader = DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=False,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
        )
        model = prior.model.to(device).eval()
        features = []
        with torch.no_grad():
            for images, _ in loader:
                features.append(model(images.to(device)).float().cpu())
        features = torch.cat(features)
        torch.save(features, out / "features.pt")
        del loader
    return clock, features


def converted_features(out: Path) -> np.ndarray | None:
    """Features of a converted folder in key order (None when this version's layout cannot be read here)."""
    try:
        from rela_convert.dataset.formats import STORAGE_FORMATS
        from rela_convert.dataset.index import DatasetIndex

        index = DatasetIndex.load(out)
        format = STORAGE_FORMATS.get(index.storage)
        pairs = [format.read_features(out / shard["name"]) for shard in index.shards()]
        keys = np.concatenate([keys for keys, _ in pairs])
        return np.concatenate([features for _, features in pairs])[np.argsort(keys, kind="stable")]
    except Exception:  # another storage layout: the agreement check is only a sanity check
        return None


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float((a * b).sum(axis=1).mean())


def run_case(case: Case, args, device: torch.device, scratch: Path) -> dict:
    import shutil

    from rela_convert.priors import load_prior

    prior = load_prior(case.prior)
    prior.model.to(device)
    if device.type == "cuda":
        prior.model.to(memory_format=torch.channels_last)
    count = len(case.files)
    cpu = device.type == "cpu"
    runs: dict[str, list[float]] = {
        "decode": [],
        "prior": [],
        "prior_best": [],
        "convert": [],
        "reference": [],
        "convert_loop": [],
    }
    cpu_ms: dict[str, list[float]] = {"decode": [], "prior": [], "prior_best": [], "convert": [], "reference": []}
    loads: list[float] = []
    agreement = None
    for repeat in range(args.repeat):
        loads.append(os.getloadavg()[0])
        clock, batches = measure_decode(case, prior.input_size, args)
        runs["decode"].append(count / clock.wall)
        cpu_ms["decode"].append(1e3 * clock.cpu / count)
        clock = measure_prior(prior, batches, device)
        runs["prior"].append(count / clock.wall)
        cpu_ms["prior"].append(1e3 * clock.cpu / count)
        clock = measure_prior_best(prior, batches, args) if cpu else clock
        runs["prior_best"].append(max(count / clock.wall, runs["prior"][-1]))
        cpu_ms["prior_best"].append(min(1e3 * clock.cpu / count, cpu_ms["prior"][-1]))
        del batches
        clock, result, out = measure_convert(case, args, scratch)
        if result.run["converted"] != count:
            raise SystemExit(f"error: convert converted {result.run['converted']} of {count} images of {case.name}")
        runs["convert"].append(count / clock.wall)
        cpu_ms["convert"].append(1e3 * clock.cpu / count)
        runs["convert_loop"].append(result.run["images_per_s"])
        clock, reference = measure_reference(case, args, device, scratch)
        runs["reference"].append(count / clock.wall)
        cpu_ms["reference"].append(1e3 * clock.cpu / count)
        if agreement is None:
            ours = converted_features(out)
            if ours is not None and ours.shape == tuple(reference.shape):
                agreement = mean_cosine(ours, reference.numpy())
        shutil.rmtree(out, ignore_errors=True)
        print(
            f"  {case.name} run {repeat + 1}/{args.repeat}: "
            + ", ".join(f"{name} {values[-1]:.1f}" for name, values in runs.items())
            + f" images/s (load {loads[-1]:.2f})",
            flush=True,
        )
    best = {name: max(values) for name, values in runs.items()}
    least_cpu = {name: min(values) for name, values in cpu_ms.items()}
    a, b = best["decode"], best["prior_best"]
    floor = min(a, b) if device.type == "cuda" else 1.0 / (1.0 / a + 1.0 / b)
    floor_as_converter = min(a, best["prior"]) if device.type == "cuda" else 1.0 / (1.0 / a + 1.0 / best["prior"])
    return {
        "input": case.name,
        "source": str(case.source),
        "prior": case.prior,
        "feature_dim": prior.feature_dim,
        "input_size": prior.input_size,
        "images": count,
        "images_per_s": best,
        "floor_images_per_s": floor,
        "floor_rule": "min(a, b*)" if device.type == "cuda" else "1 / (1/a + 1/b*)",
        "floor_with_converter_forward_images_per_s": floor_as_converter,
        "cpu_chunk": cpu_chunk(prior.input_size),
        "convert_over_floor": best["convert"] / floor,
        "convert_over_reference": best["convert"] / best["reference"],
        "cpu_ms_per_image": least_cpu,
        "cpu_convert_over_floor": (least_cpu["decode"] + least_cpu["prior_best"]) / least_cpu["convert"],
        "cpu_convert_over_reference": least_cpu["reference"] / least_cpu["convert"],
        "feature_cosine_convert_vs_reference": agreement,
        "runs": runs,
        "cpu_ms_per_image_runs": cpu_ms,
        "load_average_1min": loads,
    }


def print_table(results: list[dict]) -> None:
    header = (
        f"{'input':9s} {'prior':30s} {'images':>6s} {'a decode':>9s} {'b prior':>8s} {'b* best':>8s} {'floor':>7s} "
        f"{'c convert':>10s} {'d refer.':>9s} {'c/floor':>8s} {'c/d':>6s}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        speeds = row["images_per_s"]
        prior = row["prior"] if len(row["prior"]) <= 30 else row["prior"][:27] + "..."
        print(
            f"{row['input']:9s} {prior:30s} {row['images']:6d} {speeds['decode']:9.1f} {speeds['prior']:8.1f} "
            f"{speeds['prior_best']:8.1f} {row['floor_images_per_s']:7.1f} {speeds['convert']:10.1f} "
            f"{speeds['reference']:9.1f} {row['convert_over_floor']:8.2f} {row['convert_over_reference']:6.2f}"
        )
    print(
        "images/s, best of the runs. b: the converter's forward (Prior.features on each batch, main process); "
        "b*: the best layout found (b, or single-threaded forward in the workers in small passes); "
        f"floor = {results[0]['floor_rule']}. Goals: c/floor >= 0.8 on both, c/d >= 1.5 on imagenet."
    )
    print()
    print(
        "CPU ms per image (main process + DataLoader workers; least of the runs; less sensitive to other jobs on the "
        "machine):"
    )
    header = (
        f"{'input':9s} {'a decode':>9s} {'b prior':>8s} {'b* best':>8s} {'a+b*':>7s} {'c convert':>10s} "
        f"{'d refer.':>9s} {'(a+b*)/c':>9s} {'d/c':>6s}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        cpu = row["cpu_ms_per_image"]
        print(
            f"{row['input']:9s} {cpu['decode']:9.2f} {cpu['prior']:8.2f} {cpu['prior_best']:8.2f} "
            f"{cpu['decode'] + cpu['prior_best']:7.2f} {cpu['convert']:10.2f} {cpu['reference']:9.2f} "
            f"{row['cpu_convert_over_floor']:9.2f} {row['cpu_convert_over_reference']:6.2f}"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for every variant (default 2)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="images per batch for every variant (default 256, the converter's default)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument(
        "--limit",
        type=int,
        default=5000,
        help="at most this many images per input (default 5000; the ImageNet sample has 500)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of every variant, interleaved; the best counts (default 3)"
    )
    parser.add_argument("--inputs", default="imagenet,cifar", help="comma-separated subset of imagenet,cifar")
    parser.add_argument(
        "--decode",
        default="cpu",
        choices=("cpu", "device"),
        help=(
            "rela convert --decode for (c): device decodes JPEGs with nvJPEG on a GPU, so (c) may pass the CPU floor "
            "(default cpu)"
        ),
    )
    parser.add_argument(
        "--imagenet-prior",
        default=IMAGENET_PRIOR,
        help=f"prior spec on the ImageNet sample, e.g. rand:resnet50@224 for the GPU target (default {IMAGENET_PRIOR})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "convert.json",
        help="JSON result file (default benchmarks/results/convert.json)",
    )
    args = parser.parse_args(argv)

    from rela_convert.devices import resolve_device

    device = resolve_device(args.device)
    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} cores, gpu {info['gpu']}; torch {info['torch']}; load "
        f"{info['load_average_1min_at_start']:.2f}"
    )
    print(f"workers {args.workers}, batch {args.batch_size}, device {device}, best of {args.repeat}")
    results = []
    with tempfile.TemporaryDirectory(prefix="rela-bench-convert-") as temporary:
        scratch = Path(temporary)
        cases = []
        for name in args.inputs.split(","):
            if name == "imagenet":
                flat = imagenet_sample()
                files = sorted(flat.iterdir())
                if args.limit < len(files):
                    flat = scratch / "imagenet-flat"
                    flat.mkdir()
                    for image in files[: args.limit]:
                        os.symlink(image, flat / image.name)
                cases.append(
                    Case(
                        "imagenet",
                        flat,
                        one_class_tree(flat, scratch / "imagenet-folder"),
                        args.imagenet_prior,
                        list_images(flat),
                    )
                )
            elif name == "cifar":
                tree = cifar_subset(args.limit, scratch / "cifar")
                cases.append(Case("cifar", tree, tree, CIFAR_PRIOR, list_images(tree)))
            else:
                parser.error(f"unknown input {name!r}")
        for case in cases:
            warm_page_cache(case.files)
            print(f"{case.name}: {len(case.files)} images, prior {case.prior}", flush=True)
            results.append(run_case(case, args, device, scratch))
    print()
    print_table(results)
    payload = {
        "benchmark": "convert",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "options": {
            "workers": args.workers,
            "batch_size": args.batch_size,
            "device": str(device),
            "limit": args.limit,
            "repeat": args.repeat,
            "decode": args.decode,
            "imagenet_prior": args.imagenet_prior,
        },
        "results": results,
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
