"""Shared fixtures: real data from ../shared/, extracted once into the ignored .cache/ folder."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
CACHE = PROJECT / ".cache"
RESNET20 = SHARED / "models" / "cifar10-resnet" / "resnet20-12fca82f.th"
RESNET56 = SHARED / "models" / "cifar10-resnet" / "resnet56-4bfd9763.th"


def _extract(archive: Path, marker: Path) -> None:
    """Extract ``archive`` into CACHE unless ``marker`` already exists (atomic via a temporary folder)."""
    if marker.exists():
        return
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


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The real CIFAR-10 JPEG tree: ``<root>/{train,test}/<class>/NNNN.jpg``."""
    root = CACHE / "cifar10"
    _extract(SHARED / "data" / "cifar10-jpeg.tar.gz", root / "test")
    return root


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """500 real full-size ImageNet JPEGs in one flat folder."""
    root = CACHE / "imagenet-sample" / "images"
    _extract(SHARED / "data" / "imagenet-sample-500.tar", root)
    return root


def copy_images(source: Path, target: Path, per_class: int, classes: int = 10) -> Path:
    """Copy the first ``per_class`` images of the first ``classes`` class folders of ``source`` into ``target``."""
    for folder in sorted(source.iterdir())[:classes]:
        (target / folder.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.iterdir())[:per_class]:
            shutil.copyfile(image, target / folder.name / image.name)
    return target


@pytest.fixture(scope="session")
def small_cifar_tree(cifar_root, tmp_path_factory) -> Path:
    """20 real CIFAR-10 train images per class (200 in all), class folders."""
    return copy_images(cifar_root / "train", tmp_path_factory.mktemp("small-cifar"), per_class=20)


@pytest.fixture(scope="session")
def converted_cifar(small_cifar_tree, tmp_path_factory) -> Path:
    """``small_cifar_tree`` converted with the real CIFAR ResNet-20 prior into shards of
    64 files (4 shards), in both storage formats (WebDataset tar and HDF5)."""
    from rela_convert.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("converted-cifar") / "data"
    convert(small_cifar_tree, out, f"cifar-resnet:20:{RESNET20}", ConvertOptions(shard_size=64, batch_size=50, workers=0, progress=False, formats=("webdataset", "hdf5")))
    return out
