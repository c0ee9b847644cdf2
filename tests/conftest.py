"""Shared fixtures: real data from ../shared/, extracted once into the ignored .cache/ folder."""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _data  # noqa: E402  the shared-data helpers, one copy for tests and benchmarks
from _servers import CountingServer  # noqa: E402

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


def encoded_pictures(cifar_root: Path, imagenet_sample: Path, cifar: int, imagenet: int) -> dict:
    """Encoded bytes of the first image of each of the first ``cifar`` CIFAR-10 train classes (32 x 32) and of the
    first ``imagenet`` ImageNet sample images (full size): ``{"cifar": [...], "imagenet": [...]}``."""
    classes = sorted((cifar_root / "train").iterdir())[:cifar]
    return {
        "cifar": [min(folder.iterdir()).read_bytes() for folder in classes],
        "imagenet": [path.read_bytes() for path in sorted(imagenet_sample.iterdir())[:imagenet]],
    }


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


def assert_same_conversion(one: Path, other: Path, samples: int, shards: int) -> None:
    """``other`` (converted by several processes) is the dataset ``one`` (one process) with ``samples`` samples in
    ``shards`` shards of both formats: every file byte-identical but the index and pca.npz, the index equal but for
    the PCA file's hash, samples and features identical, and the PCA statistics equal to float64 rounding (they sum
    the same moments in another order: an all-reduce of per-process sums)."""
    import numpy as np
    import torch

    from rela_convert.dataset.index import DatasetIndex
    from rela_convert.dataset.pca import PCAStatistics

    folders = (Path(one), Path(other))
    files = [sorted(path.name for path in folder.iterdir()) for folder in folders]
    assert files[0] == files[1] and len([name for name in files[0] if name.startswith("shard-")]) == 2 * shards
    for name in files[0]:
        if name not in ("index.json", "pca.npz"):
            assert (folders[0] / name).read_bytes() == (folders[1] / name).read_bytes(), name
    index = [DatasetIndex.load(folder) for folder in folders]
    for each in index:
        each.pca.pop("sha256")
    assert index[0] == index[1]
    stored = [stored_samples(folder, "hdf5") for folder in folders]
    assert len(stored[0]) == samples
    for a, b in zip(*stored, strict=True):
        assert a["key"] == b["key"] and a["relpath"] == b["relpath"] and np.array_equal(a["feature"], b["feature"])
    pca = [PCAStatistics.load(folder / "pca.npz") for folder in folders]
    assert np.array_equal(pca[0].mean, pca[1].mean) and pca[0].count == pca[1].count == samples
    assert np.allclose(pca[0].eigenvalues, pca[1].eigenvalues, rtol=1e-9, atol=1e-12)
    # Targets use the components of non-zero eigenvalues only (fewer samples than dimensions span less).
    features = torch.from_numpy(np.stack([sample["feature"] for sample in stored[0]]))
    assert torch.allclose(pca[0].targets(features, 512), pca[1].targets(features, 512), atol=1e-6)


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


@pytest.fixture
def serve(tmp_path):
    """``serve(source, fail_every=0)``: a copy of dataset folder ``source`` served over HTTP on 127.0.0.1
    (:class:`_servers.CountingServer`); returns ``(server, dataset URL, served folder)``."""
    servers = []

    def start(source: Path, fail_every: int = 0):
        folder = tmp_path / f"www{len(servers)}"
        shutil.copytree(source, folder / "data")
        server = CountingServer(folder, fail_every)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"{server.url}/data", folder / "data"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def set_recorded_hash(data: Path, name: str, digest: str) -> None:
    """Record ``digest`` as the SHA-256 of shard ``name`` in data/index.json (every list that names it)."""
    from rela_convert.dataset.files import json_bytes

    index = json.loads((data / "index.json").read_text())
    for shard in [*index["shards"], *(record for records in index["formats"].values() for record in records)]:
        if shard["name"] == name:
            shard["sha256"] = digest
    (data / "index.json").write_bytes(json_bytes(index))


def overwrite_member(data: Path, key: int, suffix: str, content: bytes) -> str:
    """Overwrite the start of sample ``key``'s member ``<key>.<suffix>`` inside its tar shard, headers intact, and
    record the shard's new hash; returns the shard's name."""
    from rela_convert.dataset.files import sha256_file

    for shard in sorted(data.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            member = next((m for m in archive.getmembers() if m.name == f"{key:09d}.{suffix}"), None)
        if member is not None:
            with open(shard, "r+b") as handle:
                handle.seek(member.offset_data)
                handle.write(content[: member.size].ljust(min(len(content), member.size), b"\0"))
            set_recorded_hash(data, shard.name, sha256_file(shard))
            return shard.name
    raise AssertionError(f"no member {key}.{suffix}")


@pytest.fixture(scope="session")
def damaged_cifar(converted_cifar, tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """``converted_cifar`` with one undecodable image and one damaged feature among the first epoch's samples at
    data ratio 0.5, the 11th and the 61st of its 96 (of two ranks, one in each rank's half), the tar headers and the
    recorded hashes fitting, so only decoding fails; returns (data, {key: shard name})."""
    from rela_train.config import TrainConfig
    from rela_train.trainer import Trainer

    data = copy_dataset(converted_cifar, tmp_path_factory.mktemp("damaged") / "data")
    config = TrainConfig(
        arch="resnet18", stem="imagenet", input_size=32, batch_size=16, epochs=1, data_ratio=0.5, workers=0, rela="off"
    )
    plan = Trainer(data, tmp_path_factory.mktemp("unused"), config).stream.plan()
    image_key, feature_key = int(plan.keys[10]), int(plan.keys[60])
    shards = {
        image_key: overwrite_member(data, image_key, "jpg", bytes(4096)),
        feature_key: overwrite_member(data, feature_key, "prior.npy", b"garbage!"),
    }
    return data, shards


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
