"""Shards round-trip: every sample holds the source file's exact bytes, its label and
path, and the same feature a direct prior call gives; the index describes the files."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import RESNET20

from rela_convert.dataset.files import sha256_file
from rela_convert.dataset.formats.webdataset import FEATURE_FIELD, decode_feature, iter_records
from rela_convert.dataset.index import DatasetIndex
from rela_convert.images import prior_pixels
from rela_convert.priors import load_prior


def test_shards_round_trip(converted_cifar, small_cifar_tree):
    index = DatasetIndex.load(converted_cifar)
    prior = load_prior(f"cifar-resnet:20:{RESNET20}")
    sources = sorted(path for path in small_cifar_tree.rglob("*.jpg"))
    assert index.num_samples == len(sources) == 200 and index.num_skipped == 0
    assert index.classes == sorted(folder.name for folder in small_cifar_tree.iterdir())
    assert [shard["num_samples"] for shard in index.shards("webdataset")] == [64, 64, 64, 8]
    keys, features = [], []
    for shard in index.shards("webdataset"):
        path = converted_cifar / shard["name"]
        assert (shard["bytes"], shard["sha256"]) == (path.stat().st_size, sha256_file(path))
        records = list(iter_records(path))
        assert len(records) == shard["num_samples"]
        for record in records:
            key = int(record["__key__"])
            source = small_cifar_tree / record["path"].decode()
            assert source == sources[key]
            assert record["jpg"] == source.read_bytes()  # the original bytes, not re-encoded
            assert index.classes[int(record["cls"])] == source.parent.name
            feature = decode_feature(record[FEATURE_FIELD])
            assert feature.dtype == np.float32 and feature.shape == (64,)
            if key % 10 == 0:
                direct = prior.features(prior_pixels(source.read_bytes(), prior.input_size)[None])[0]
                # A batch of one may take other float32 kernels than the conversion's batches.
                assert torch.allclose(torch.from_numpy(feature), direct, rtol=1e-5, atol=1e-6)
            keys.append(key)
            features.append(feature)
    order = np.random.default_rng(0).permutation(200)  # the stored order: index.order
    assert index.order == {"seed": 0, "rule": "numpy.random.default_rng(seed).permutation(num_files)"}
    assert keys == order.tolist()
    # Bit for bit: the conversion's batches are fixed ranges of 50 stored positions inside each shard of 64.
    batches = [
        range(start, min(start + 50, end))
        for end in (64, 128, 192, 200)
        for start in range(end - 64 if end < 200 else 192, end, 50)
    ]
    direct = torch.cat(
        [
            prior.features(torch.stack([prior_pixels(sources[order[position]].read_bytes(), 32) for position in batch]))
            for batch in batches
        ]
    )
    assert torch.equal(torch.from_numpy(np.stack(features)), direct)
    assert np.array_equal(np.load(converted_cifar / index.keys_file), order)
    assert (converted_cifar / "skipped.jsonl").read_text() == ""
    assert index.prior["weights_sha256"] == sha256_file(RESNET20)
    assert index.subset == {"strategy": "random", "data_ratio": 0.5, "seed": 0}
    assert json.loads((converted_cifar / "index.json").read_text()) == index.to_dict()


def test_feature_decoding_checks_the_npy_header(converted_cifar):
    index = DatasetIndex.load(converted_cifar)
    record = next(iter_records(converted_cifar / index.shards("webdataset")[0]["name"]))
    stored = record[FEATURE_FIELD]
    decoded = decode_feature(stored)
    assert np.array_equal(decoded, np.load(io.BytesIO(stored), allow_pickle=False)) and decoded.flags.writeable
    matrix = io.BytesIO()
    np.save(matrix, np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="one C-order row"):
        decode_feature(matrix.getvalue())
    with pytest.raises(ValueError, match="magic"):
        decode_feature(b"not an npy file, e.g. a damaged member")
