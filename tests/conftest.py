"""Shared fixtures: real data from ../shared/, extracted once into the ignored .cache/ folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _data  # noqa: E402  the shared-data helpers, one copy for tests and benchmarks

PROJECT, SHARED, CACHE = _data.PROJECT, _data.SHARED, _data.CACHE
RESNET20, RESNET56 = _data.RESNET20, _data.RESNET56


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The real CIFAR-10 JPEG tree: ``<root>/{train,test}/<class>/NNNN.jpg``."""
    return _data.cifar_root()


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """500 real full-size ImageNet JPEGs in one flat folder."""
    return _data.imagenet_sample()


def stored_samples(root: Path, format: str | None = None) -> list[dict]:
    """Every sample dict of the converted dataset at ``root``, in stored order, read from its ``format``
    shards (None: the index's default), as :meth:`rela_convert.dataset.formats.StorageFormat.iter_samples` yields
    them."""
    from rela_convert.dataset.formats import STORAGE_FORMATS
    from rela_convert.dataset.index import DatasetIndex

    index = DatasetIndex.load(root)
    format = format or index.storage
    reader = STORAGE_FORMATS.get(format)
    return [sample for shard in index.shards(format) for sample in reader.iter_samples(Path(root) / shard["name"])]


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
    from rela_convert.config import ConvertOptions
    from rela_convert.convert import convert

    out = tmp_path_factory.mktemp("converted-cifar") / "data"
    convert(
        small_cifar_tree,
        out,
        f"cifar-resnet:20:{RESNET20}",
        ConvertOptions(shard_size=64, batch_size=50, workers=0, progress=False, formats=("webdataset", "hdf5")),
    )
    return out


class Killed(Exception):
    """Raised in place of a kill (:func:`kill_at_step`)."""


def kill_at_step(trainer, step: int | None) -> None:
    """Make ``trainer`` raise :class:`Killed` before its optimiser step ``step + 1`` (None: never), as a kill would."""
    if step is None:
        return
    train_step = trainer.train_step

    def dies(*args):
        if trainer.step == step:
            raise Killed
        return train_step(*args)

    trainer.train_step = dies
