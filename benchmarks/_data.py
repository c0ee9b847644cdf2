"""Shared set-up of the benchmarks: the real data from ``../shared/data`` and small trees made from it.

The archives are extracted once into the project's ignored ``.cache/`` folder
(the same logic as ``tests/conftest.py``, kept separate so benchmarks never
import the tests). Subsets are trees of symbolic links, so they cost no copies.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
#: The shared data and priors: ``../shared`` beside the project, or ``$RELA_SHARED`` (the GPU check carries a subset,
#: ``benchmarks/gpu/prepare.sh``).
SHARED = Path(os.environ.get("RELA_SHARED", PROJECT.parent / "shared")).resolve()
CACHE = PROJECT / ".cache"
RESULTS = PROJECT / "benchmarks" / "results"
RESNET20 = SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th"
RESNET56 = SHARED / "models" / "cifar10-resnet" / "resnet56-4bfd9763.th"
#: The 224 px MobileNetV3-Small-sized prior of issue 4 (random init: speed does not depend on weights).
IMAGENET_PRIOR = "rand:mobilenet_v3_small@224"
#: The 32 px CIFAR prior (64-d features).
CIFAR_PRIOR = f"cifar-resnet:20:{RESNET20}"


def extract(archive: Path, marker: Path) -> None:
    """Extract ``archive`` into :data:`CACHE` unless ``marker`` exists (atomic through a temporary folder)."""
    if marker.exists():
        return
    if not archive.is_file():
        raise SystemExit(
            f"error: {archive} is missing: the demo, the tests and the benchmarks read the shared data in ../shared/,"
            f" beside the project folder {PROJECT}; clone or move the project next to that folder"
        )
    CACHE.mkdir(exist_ok=True)
    temporary = CACHE / f".extract-{archive.name}"
    shutil.rmtree(temporary, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(temporary, filter="data")
    for entry in temporary.iterdir():
        target = CACHE / entry.name
        if not target.exists():
            entry.rename(target)
    shutil.rmtree(temporary, ignore_errors=True)


def cifar_root() -> Path:
    """``.cache/cifar10`` with ``{train,test}/<class>/NNNN.jpg`` (50,000 + 10,000 images)."""
    root = CACHE / "cifar10"
    extract(SHARED / "data" / "cifar10-jpeg.tar.gz", root / "test")
    return root


def imagenet_sample() -> Path:
    """``.cache/imagenet-sample/images``: 500 full-size ImageNet JPEGs in one flat folder (fewer from the GPU check's
    ``imagenet-sample-<N>.tar``)."""
    root = CACHE / "imagenet-sample" / "images"
    archives = sorted((SHARED / "data").glob("imagenet-sample-*.tar"))
    extract(archives[0] if archives else SHARED / "data" / "imagenet-sample-500.tar", root)
    return root


def cifar_subset(count: int, target: Path, split: str = "train") -> Path:
    """A class-folder tree of symbolic links to the first ``count`` CIFAR-10 images of ``split``
    (``train`` or ``test``), taken evenly across the 10 classes (the whole folder when ``count`` is
    at least its size). An existing ``target`` is left as it is."""
    if target.exists():
        return target
    source = cifar_root() / split
    classes = sorted(path for path in source.iterdir() if path.is_dir())
    per_class, extra = divmod(count, len(classes))
    for index, folder in enumerate(classes):
        (target / folder.name).mkdir(parents=True, exist_ok=True)
        images = sorted(folder.iterdir())[: per_class + (index < extra)]
        for image in images:
            os.symlink(image, target / folder.name / image.name)
    return target


def one_class_tree(flat: Path, target: Path) -> Path:
    """``target/all/<links to every image of flat>``: a flat folder as torchvision's ImageFolder wants it."""
    (target / "all").mkdir(parents=True, exist_ok=True)
    for image in sorted(flat.iterdir()):
        os.symlink(image, target / "all" / image.name)
    return target


def list_images(root: Path) -> list[Path]:
    """Every image file under ``root`` (links followed), sorted, as the converter lists them."""
    from rela_convert.tree import scan_tree

    return [Path(file.path) for file in scan_tree(root).files]


def warm_page_cache(files: list[Path]) -> int:
    """Read every file once so that all measured variants start with the same (warm) page cache; returns bytes."""
    total = 0
    for path in files:
        total += len(path.read_bytes())
    return total


def evict_page_cache(files: list[Path]) -> None:
    """Drop every file's pages from the page cache (``posix_fadvise(DONTNEED)``, no root needed),
    so the next read comes from disk: the cold-cache case of a dataset larger than RAM."""
    for path in files:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def machine() -> dict:
    """What the figures were measured on, and how busy it was (other jobs share these cores)."""
    import PIL
    import torch
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "commit": commit,
        "load_average_1min_at_start": os.getloadavg()[0],
    }


def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (a ``torch.device``) before reading a clock: CUDA only; the CPU runs
    synchronously. torch is imported here only, so the data helpers stay light."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON, creating the folder, and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":  # used by pipelines/ and experiments/ scripts: python benchmarks/_data.py SPLIT COUNT TARGET
    import sys

    if len(sys.argv) != 4 or sys.argv[1] not in ("train", "test") or not sys.argv[2].isdigit():
        raise SystemExit("usage: python benchmarks/_data.py train|test COUNT TARGET  (a CIFAR-10 tree of links)")
    cifar_subset(int(sys.argv[2]), Path(sys.argv[3]), sys.argv[1])


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its reaped children (DataLoader workers).

    Other jobs on a shared machine change wall times a lot, CPU seconds per image much less.
    """
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds of a block (``with Clock() as clock: ...; clock.wall, clock.cpu``)."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu
