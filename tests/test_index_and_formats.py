"""``index.json`` through :class:`rela_convert.dataset.index.DatasetIndex`, and storage formats as a registry:
a format defined in this file only is written by ``convert``, verified, and streamed by the trainer."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import click
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PROJECT, RESNET20, stored_samples
from torch.utils.data import DataLoader

from cli import main
from rela_convert.click_options import RegistryList
from rela_convert.config import ConvertOptions
from rela_convert.convert import convert
from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.files import DatasetError
from rela_convert.dataset.formats import (
    STORAGE_FORMATS,
    Sample,
    StorageFormat,
    finish_shard,
    preferred_format,
    register_format,
)
from rela_convert.dataset.index import INDEX_NAME, DatasetIndex, ShardRecord
from rela_convert.dataset.verify import verify_dataset
from rela_convert.registry import RegistryError
from rela_train.data.stream import TrainStream
from rela_train.views import rela_view


class JsonLinesWriter:
    """Writes one JSON line per sample to ``<path>.tmp``, renamed to ``path`` on close."""

    def __init__(self, path: Path) -> None:
        self.path, self.temporary = path, path.with_name(path.name + ".tmp")
        self.handle = open(self.temporary, "w")
        self.count = 0

    def write(self, sample: Sample) -> None:
        row = {
            "key": sample.key,
            "image": base64.b64encode(sample.image).decode(),
            "ext": sample.ext,
            "feature": sample.feature.tolist(),  # float32 -> Python floats -> float32 again: exact
            "label": -1 if sample.label is None else sample.label,
            "relpath": base64.b64encode(sample.relpath).decode(),
        }
        self.handle.write(json.dumps(row) + "\n")
        self.count += 1

    def close(self) -> ShardRecord:
        self.handle.close()
        return finish_shard(self.temporary, self.path, self.count)


@register_format("jsonl-test")
class JsonLines(StorageFormat):
    """Test-only storage format: one JSON line per sample (bytes in base64, the feature as a list)."""

    suffix = ".jsonl"

    @classmethod
    def writer(cls, path: Path, options: ConvertOptions) -> JsonLinesWriter:
        return JsonLinesWriter(path)

    @classmethod
    def iter_samples(cls, path: str | Path) -> Iterator[dict]:
        with open(path) as handle:
            for line in handle:
                row = json.loads(line)
                yield {
                    "key": row["key"],
                    "image": base64.b64decode(row["image"]),
                    "ext": row["ext"],
                    "feature": np.asarray(row["feature"], np.float32),
                    "label": row["label"],
                    "relpath": base64.b64decode(row["relpath"]),
                }


def epoch(dataset: ConvertedDataset, workers: int) -> list[tuple]:
    """``(label, feature...)`` of every sample one training epoch yields, sorted (as test_train's epoch_features)."""
    stream = TrainStream(dataset, 32, (rela_view(32), rela_view(32)), data_ratio=0.25, seed=0, batch_size=10)
    stream.set_epoch(1)
    batches = list(DataLoader(stream, batch_size=10, num_workers=workers, drop_last=True))
    for view_1, view_2, _, _ in batches:
        assert view_1.shape == view_2.shape == (10, 3, 32, 32)
    return sorted(
        (int(label), *row)
        for _, _, features, labels in batches
        for label, row in zip(labels.tolist(), features.numpy().tolist())
    )


def test_index_round_trips_byte_for_byte(converted_cifar, tmp_path):
    written = (converted_cifar / INDEX_NAME).read_bytes()
    index = DatasetIndex.load(converted_cifar)
    index.save(tmp_path)
    assert (tmp_path / INDEX_NAME).read_bytes() == written
    assert DatasetIndex.from_dict(json.loads(written)) == index and index.run is None
    assert index.to_dict() == json.loads(written)
    assert (index.num_samples, index.feature_dim, index.storage, index.train_size) == (200, 64, "hdf5", 32)
    assert index.pca is not None and index.pca["count"] == 200
    summary = json.loads(CliRunner().invoke(main, ["inspect", str(converted_cifar), "--json"]).output)
    assert summary == index.summary()
    assert summary["num_shards"] == 4 and summary["formats"]["webdataset"]["num_shards"] == 4


def test_shards_of_a_missing_format_name_the_formats_held(converted_cifar):
    index = DatasetIndex.load(converted_cifar)
    assert index.shards() == index.shards("hdf5") == index.formats["hdf5"]
    assert [shard["name"] for shard in index.shards("webdataset")] == [f"shard-{n:06d}.tar" for n in range(4)]
    with pytest.raises(ValueError, match="holds hdf5, webdataset shards, not jsonl-test"):
        index.shards("jsonl-test")
    with pytest.raises(ValueError, match=f"{converted_cifar}: the dataset holds hdf5, webdataset shards, not jsonl"):
        ConvertedDataset(converted_cifar, "jsonl-test")


def test_an_incomplete_or_foreign_index_is_refused(converted_cifar, tmp_path):
    data = json.loads((converted_cifar / INDEX_NAME).read_text())
    (tmp_path / INDEX_NAME).write_text(json.dumps({**data, "extra": 1}))
    with pytest.raises(DatasetError, match="missing: none; unknown: extra"):
        DatasetIndex.load(tmp_path)
    del data["image_sizes"]
    (tmp_path / INDEX_NAME).write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="missing: image_sizes; unknown: none"):
        DatasetIndex.load(tmp_path)
    (tmp_path / INDEX_NAME).write_text('{"format": "rela-conv')
    with pytest.raises(DatasetError, match="is not valid JSON"):
        DatasetIndex.load(tmp_path)
    with pytest.raises(DatasetError, match="has no index.json"):
        DatasetIndex.load(tmp_path / "nothing")


def test_format_registry_preference_and_cli_lists():
    assert STORAGE_FORMATS.names()[:2] == ["webdataset", "hdf5"] and STORAGE_FORMATS.get("jsonl-test") is JsonLines
    assert (STORAGE_FORMATS.get("hdf5").suffix, STORAGE_FORMATS.get("webdataset").suffix) == (".h5", ".tar")
    assert preferred_format(["webdataset", "hdf5"]) == "hdf5"  # reads faster
    assert preferred_format(["jsonl-test", "webdataset"]) == "webdataset"
    assert preferred_format(iter(["jsonl-test"])) == "jsonl-test"
    with pytest.raises(ValueError, match="no known storage format among"):
        preferred_format(["npz"])
    with pytest.raises(RegistryError, match="unknown storage format 'npz'"):
        STORAGE_FORMATS.get("npz")
    formats = RegistryList("rela_convert.dataset.formats:STORAGE_FORMATS", aliases={"both": ("webdataset", "hdf5")})
    assert formats.convert("both", None, None) == formats.convert("hdf5, webdataset", None, None)
    assert formats.convert("both", None, None) == ("webdataset", "hdf5")  # registry order: resumable either way
    assert formats.convert("jsonl-test,hdf5,hdf5", None, None) == ("hdf5", "jsonl-test")
    with pytest.raises(click.BadParameter, match="'npz' is not one of webdataset, hdf5"):
        formats.convert("hdf5,npz", None, None)


def test_listing_the_formats_imports_no_torch():
    """``rela --help`` and the --format choices (``rela convert --help`` shows them) import neither torch nor
    webdataset: formats import their heavy libraries when they read or write."""
    code = (
        "import sys\nfrom click.testing import CliRunner\nimport cli\n"
        "assert CliRunner().invoke(cli.main, ['--help']).exit_code == 0\n"
        "option = next(param for param in cli.main.commands['convert'].params if param.name == 'formats')\n"
        "assert option.type.get_metavar(option) == '[webdataset|hdf5|both][,...]', option.type.get_metavar(option)\n"
        "assert option.type.convert('both', option, None) == ('webdataset', 'hdf5')\n"
        "assert 'torch' not in sys.modules and 'webdataset' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_format_defined_in_this_file_converts_verifies_and_trains(small_cifar_tree, converted_cifar, tmp_path):
    out = tmp_path / "data"
    options = ConvertOptions(shard_size=64, batch_size=50, workers=0, progress=False, formats=("jsonl-test",))
    index = convert(small_cifar_tree, out, f"cifar-resnet:20:{RESNET20}", options)
    assert index.storage == "jsonl-test" and list(index.formats) == ["jsonl-test"] and index.run["converted"] == 200
    assert [shard["name"] for shard in index.shards()] == [f"shard-{n:06d}.jsonl" for n in range(4)]
    assert [shard["num_samples"] for shard in index.shards()] == [64, 64, 64, 8]
    assert DatasetIndex.load(out) == index

    # The same samples, order and features as the built-in formats (same shard and batch ranges).
    ours, reference = stored_samples(out), stored_samples(converted_cifar, "hdf5")
    assert len(ours) == 200
    for a, b in zip(ours, reference, strict=True):
        assert {**a, "feature": None} == {**b, "feature": None} and np.array_equal(a["feature"], b["feature"])
    for name in ("keys.npy", "pca.npz"):
        assert (out / name).read_bytes() == (converted_cifar / name).read_bytes(), name
    assert verify_dataset(out) == (6, [])  # 4 shards, keys.npy, pca.npz

    dataset = ConvertedDataset(out)
    assert dataset.storage == "jsonl-test" and dataset.format is JsonLines and dataset.shards == index.shards()
    trained = epoch(dataset, workers=2)  # read inside DataLoader worker processes
    assert len(trained) == 50 and trained == epoch(ConvertedDataset(converted_cifar, "hdf5"), workers=0)

    # A dataset whose format no installed rela registers: verify names it, training refuses it.
    gone = tmp_path / "gone"
    shutil.copytree(out, gone)
    index.formats = {"gone": index.formats["jsonl-test"]}
    index.storage = "gone"
    index.save(gone)
    problems = verify_dataset(gone)[1]
    assert len(problems) == 1 and problems[0].startswith("index.json: unknown storage format 'gone' (this rela reads")
    with pytest.raises(RegistryError, match="unknown storage format 'gone'"):
        ConvertedDataset(gone)
