"""Conversion stores samples in a seeded pseudo-random order (so every shard mixes the classes of a
class-folder tree) and records the sizes of the images it saw, from which the default training
input size follows (method.md, stage 2)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import RESNET20, copy_images, stored_samples
from PIL import Image

from rela_convert.config import ConvertOptions
from rela_convert.convert import ConversionError, convert
from rela_convert.dataset.files import DatasetError
from rela_convert.dataset.index import DatasetIndex

RESNET20_SPEC = f"cifar-resnet:20:{RESNET20}"


@pytest.fixture(scope="module")
def cifar_500(cifar_root, tmp_path_factory):
    """500 real CIFAR-10 train images (50 per class, class folders, so the sorted listing is class-sorted)."""
    return copy_images(cifar_root / "train", tmp_path_factory.mktemp("cifar-500") / "src", per_class=50)


def test_shards_mix_the_classes_in_the_seeded_order(cifar_500, tmp_path):
    options = ConvertOptions(shard_size=100, batch_size=50, workers=0, progress=False)
    index = convert(cifar_500, tmp_path / "seed0", RESNET20_SPEC, options)
    assert index.num_samples == 500 and len(index.shards()) == 5
    assert index.order == {"seed": 0, "rule": "numpy.random.default_rng(seed).permutation(num_files)"}
    assert index.job["order_seed"] == 0

    keys = np.load(tmp_path / "seed0" / "keys.npy")
    assert keys.dtype == np.int64 and sorted(keys.tolist()) == list(range(500))
    assert np.array_equal(keys, np.random.default_rng(0).permutation(500))

    samples = stored_samples(tmp_path / "seed0")
    assert [sample["key"] for sample in samples] == keys.tolist()  # shards are consecutive slices of keys.npy
    for sample in samples:  # each label is its source folder's class
        assert index.classes[sample["label"]] == sample["relpath"].split(b"/")[0].decode()
    for shard in range(5):
        classes = {sample["label"] for sample in samples[shard * 100 : (shard + 1) * 100]}
        assert len(classes) >= 8, f"shard {shard} holds only {len(classes)} classes"

    other = convert(cifar_500, tmp_path / "seed1", RESNET20_SPEC, replace(options, order_seed=1))
    other_keys = np.load(tmp_path / "seed1" / "keys.npy")
    assert other.order["seed"] == 1 and np.array_equal(other_keys, np.random.default_rng(1).permutation(500))
    assert not np.array_equal(other_keys, keys)
    # The same samples and features, only stored in another order.
    features = {sample["key"]: sample["feature"] for sample in samples}
    for sample in stored_samples(tmp_path / "seed1"):
        assert np.array_equal(sample["feature"], features[sample["key"]])

    # A resume or re-run with another order seed into the same OUT is refused.
    with pytest.raises(ConversionError, match="order_seed: 0 there, 1 now"):
        convert(cifar_500, tmp_path / "seed0", RESNET20_SPEC, replace(options, order_seed=1))


def test_cifar_image_sizes_give_a_training_size_of_32(converted_cifar):
    index = DatasetIndex.load(converted_cifar)
    assert index.image_sizes == {"shorter_side_min": 32, "shorter_side_median": 32, "shorter_side_max": 32}
    assert index.train_size == 32


def test_imagenet_image_sizes_match_pillow(imagenet_sample, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for path in sorted(imagenet_sample.iterdir())[::25][:20]:
        shutil.copyfile(path, src / path.name)
    (src / "empty.jpg").write_bytes(b"")  # skipped: not counted
    sides = sorted(min(Image.open(path).size) for path in src.iterdir() if path.stat().st_size)
    assert len(sides) == 20 and sides[0] < sides[-1]

    options = ConvertOptions(shard_size=8, batch_size=4, workers=1, progress=False)
    index = convert(src, tmp_path / "out", "rand:mobilenet_v3_small@64", options)
    assert index.num_samples == 20 and index.num_skipped == 1
    # sides[9]: the lower median of 20
    expected = {"shorter_side_min": sides[0], "shorter_side_median": sides[9], "shorter_side_max": sides[-1]}
    assert index.image_sizes == expected
    assert index.train_size == min(224, sides[9]) == 224  # full-size ImageNet: the usual 224 crop


def test_a_dataset_of_the_old_format_is_refused(converted_cifar, small_cifar_tree, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(converted_cifar, data)
    index = json.loads((data / "index.json").read_text())
    index["format_version"] = 1
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(DatasetError, match="v1; this rela reads 'rela-converted' v2: convert it again with this rela"):
        DatasetIndex.load(data)
    options = ConvertOptions(shard_size=64, batch_size=50, workers=0, progress=False, formats=("webdataset", "hdf5"))
    with pytest.raises(ConversionError, match="convert it again with this rela"):
        convert(small_cifar_tree, data, RESNET20_SPEC, options)
