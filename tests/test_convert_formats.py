"""HDF5 and WebDataset shards of the same conversion hold the same samples, and both
stream through the one reader API (rela_convert.dataset.formats), also inside DataLoader worker processes."""

from __future__ import annotations

import h5py
import numpy as np
import torch
from conftest import RESNET20, copy_images, stored_samples
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rela_convert.config import ConvertOptions
from rela_convert.convert import convert
from rela_convert.dataset.formats import STORAGE_FORMATS
from rela_convert.dataset.index import DatasetIndex
from rela_convert.images import prior_pixels
from rela_convert.priors import load_prior


def shard_names(index: DatasetIndex, format: str) -> list[str]:
    return [shard["name"] for shard in index.shards(format)]


def test_both_formats_hold_the_same_samples(converted_cifar, small_cifar_tree):
    index = DatasetIndex.load(converted_cifar)
    assert index.storage == "hdf5" and index.shards() == index.formats["hdf5"]  # read faster than tar
    tar, hdf5 = index.shards("webdataset"), index.shards("hdf5")
    assert [shard["name"] for shard in hdf5] == [f"shard-{number:06d}.h5" for number in range(4)]
    assert [shard["num_samples"] for shard in tar] == [shard["num_samples"] for shard in hdf5] == [64, 64, 64, 8]
    assert set(tar[0]) == set(hdf5[0]) == {"name", "num_samples", "bytes", "sha256"}
    from_tar, from_hdf5 = stored_samples(converted_cifar, "webdataset"), stored_samples(converted_cifar, "hdf5")
    assert len(from_tar) == len(from_hdf5) == 200
    for a, b in zip(from_tar, from_hdf5):
        assert a.keys() == b.keys() == {"key", "image", "ext", "feature", "label", "relpath"}
        assert (a["key"], a["image"], a["ext"], a["label"], a["relpath"]) == (
            b["key"],
            b["image"],
            b["ext"],
            b["label"],
            b["relpath"],
        )
        assert a["feature"].dtype == b["feature"].dtype == np.float32 and np.array_equal(a["feature"], b["feature"])
        assert a["image"] == (small_cifar_tree / a["relpath"].decode()).read_bytes()
        assert index.classes[a["label"]] == a["relpath"].split(b"/")[0].decode()


def test_hdf5_layout(converted_cifar):
    with h5py.File(converted_cifar / "shard-000001.h5", "r") as file:
        assert dict(file.attrs) == {"format": "rela-shard", "format_version": 1, "feature_dim": 64}
        assert set(file) == {"key", "image", "ext", "feature", "label", "path"}
        assert (
            file["feature"].shape == (64, 64)
            and file["feature"].dtype == np.float32
            and file["feature"].chunks is not None
        )
        assert list(file["key"][:]) == np.random.default_rng(0).permutation(200)[64:128].tolist()  # stored order
        assert h5py.check_vlen_dtype(file["image"].dtype) == np.uint8


class ShardSplit(IterableDataset):
    """Each DataLoader worker reads every n-th shard of ``format`` (a StorageFormat), opening files in the worker."""

    def __init__(self, root, names, format):
        self.root, self.names, self.format = root, names, format

    def __iter__(self):
        worker = get_worker_info()
        names = self.names[worker.id :: worker.num_workers] if worker else self.names
        for name in names:
            for sample in self.format.iter_samples(self.root / name):
                yield sample["key"], torch.from_numpy(sample["feature"])


def test_hdf5_streams_inside_worker_processes(converted_cifar):
    index = DatasetIndex.load(converted_cifar)
    names, hdf5 = shard_names(index, "hdf5"), STORAGE_FORMATS.get("hdf5")
    pending = hdf5.iter_samples(converted_cifar / names[0])  # lazy: nothing opened yet
    loader = DataLoader(ShardSplit(converted_cifar, names, hdf5), batch_size=None, num_workers=2)
    streamed = {key: feature for key, feature in loader}
    assert sorted(streamed) == list(range(200))
    for sample in stored_samples(converted_cifar, "webdataset"):
        assert torch.equal(streamed[sample["key"]], torch.from_numpy(sample["feature"]))
    assert next(pending)["key"] == np.random.default_rng(0).permutation(200)[0]


def test_hdf5_only_with_compression(cifar_root, tmp_path):
    src = copy_images(cifar_root / "test", tmp_path / "src", per_class=3, classes=4)
    index = convert(
        src,
        tmp_path / "out",
        f"cifar-resnet:20:{RESNET20}",
        ConvertOptions(
            shard_size=5, batch_size=5, workers=0, progress=False, formats=("hdf5",), hdf5_compression="gzip"
        ),
    )
    assert index.storage == "hdf5" and list(index.formats) == ["hdf5"] and index.num_samples == 12
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "index.json",
        "keys.npy",
        "pca.npz",
        "shard-000000.h5",
        "shard-000001.h5",
        "shard-000002.h5",
        "skipped.jsonl",
    ]
    with h5py.File(tmp_path / "out" / "shard-000000.h5", "r") as file:
        assert file["feature"].compression == "gzip"
    prior = load_prior(f"cifar-resnet:20:{RESNET20}")
    samples = stored_samples(tmp_path / "out", "hdf5")
    sources = [sorted(src.rglob("*.jpg"))[key] for key in np.random.default_rng(0).permutation(12)]  # stored order
    assert [sample["relpath"] for sample in samples] == [str(path.relative_to(src)).encode() for path in sources]
    pixels = torch.stack([prior_pixels(path.read_bytes(), 32) for path in sources])
    direct = torch.cat([prior.features(pixels[start : start + 5]) for start in range(0, 12, 5)])
    assert torch.equal(torch.from_numpy(np.stack([sample["feature"] for sample in samples])), direct)
    assert all(sample["image"] == path.read_bytes() for sample, path in zip(samples, sources))


def test_tar_shards_are_the_bytes_of_webdataset_tarwriter(tmp_path):
    """The tar writer builds member headers from a template instead of going through tarfile: its shards must be
    byte for byte what webdataset's TarWriter (and np.save for the features) write for the same samples."""
    import io

    import webdataset as wds

    from rela_convert.dataset.formats.base import Sample
    from rela_convert.dataset.formats.webdataset import (
        FEATURE_FIELD,
        TarShardWriter,
        encode_feature,
        format_key,
        member_header,
    )

    rng = np.random.default_rng(0)
    samples = [
        Sample(0, b"\xff\xd8jpeg", "jpg", rng.standard_normal(64).astype(np.float32), 3, b"cat/0001.jpg"),
        Sample(17, bytes(range(256)) * 3, "png", rng.standard_normal(7).astype(np.float64), None, b"flat.png"),
        Sample(123456789, b"x" * 512, "webp", np.zeros(1280, np.float32), 0, "d\u00e9j\u00e0/\u00e9.webp".encode()),
        Sample(5, b"", "bmp", rng.standard_normal(64).astype(np.float32), 1234567, b"a/" + b"n" * 300 + b".bmp"),
    ]
    for count in (0, 1, len(samples)):
        ours = TarShardWriter(tmp_path / f"ours-{count}.tar")
        stream = io.BytesIO()
        theirs = wds.TarWriter(stream, user="rela", group="rela", mode=0o444, mtime=0, encoder=False)
        for sample in samples[:count]:
            ours.write(sample)
            record = {"__key__": format_key(sample.key), sample.ext: sample.image, "path": sample.relpath}
            record[FEATURE_FIELD] = encode_feature(sample.feature)
            if sample.label is not None:
                record["cls"] = str(sample.label).encode()
            theirs.write(record)
        ours.close()
        theirs.close()
        assert (tmp_path / f"ours-{count}.tar").read_bytes() == stream.getvalue()
    for feature in (samples[0].feature, samples[1].feature, np.arange(3, dtype=np.float32)):
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(feature, dtype=np.float32), allow_pickle=False)
        assert encode_feature(feature) == buffer.getvalue()
    import tarfile

    for name, size in (("x" * 100, 1), ("x" * 101, 2), ("\u00e9.jpg", 3), ("000000001.cls", 8**11)):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "rela", "rela"
        assert member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
