"""Damaged tar shards cost only what is damaged: 200 random single-byte flips over the real converted CIFAR-10 shards
of ``converted_cifar`` (200 samples, 4 tar shards), in rounds of 25 on fresh copies. Every flip is caught by ``rela
inspect --verify``; with ``--verify-shards off`` the training stream lists at most the sample whose bytes a flip hit
(a damaged tar header is skipped to the next valid one), delivers or lists every other sample, and never stops;
a batch none of whose samples can be used trains on the next batch's instead of stopping the run.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RESNET20, copy_dataset, copy_images, overwrite_member

from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.verify import verify_dataset
from rela_train.config import TrainConfig
from rela_train.data.stream import TrainStream
from rela_train.trainer import Trainer
from rela_train.views import rela_view

ROUNDS, FLIPS = 8, 25
BATCH = 8


def member_spans(shard: Path) -> list[tuple[int, int, int]]:
    """``(first byte, end byte, key)`` of each member of a tar shard: its header, data and padding."""
    with tarfile.open(shard) as archive:
        return [
            (member.offset, member.offset_data + -(-member.size // 512) * 512, int(member.name.partition(".")[0]))
            for member in archive.getmembers()
        ]


def flip_bytes(data: Path, flips: int, rng: random.Random) -> tuple[set[str], set[int]]:
    """Flip ``flips`` random bytes (distinct positions) of the tar shards of ``data``, weighted by size; returns the
    names of the shards changed and the keys of the samples whose bytes were hit."""
    shards = sorted(data.glob("shard-*.tar"))
    spans = {shard: member_spans(shard) for shard in shards}  # before any flip
    starts = np.cumsum([0] + [shard.stat().st_size for shard in shards])
    changed, hit = set(), set()
    for position in rng.sample(range(int(starts[-1])), flips):
        index = int(np.searchsorted(starts, position, side="right")) - 1
        shard, offset = shards[index], position - int(starts[index])
        hit |= {key for first, end, key in spans[shard] if first <= offset < end}
        with open(shard, "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)[0]
            handle.seek(offset)
            handle.write(bytes([byte ^ rng.randrange(1, 256)]))
        changed.add(shard.name)
    return changed, hit


def stream(data: Path, verify_shards: str = "off", batch_size: int = BATCH) -> TrainStream:
    """The in-process training stream of one epoch over every sample of ``data``."""
    view = rela_view(32)
    return TrainStream(
        ConvertedDataset(data, "webdataset"), 32, (view, view), 1.0, 0, batch_size, verify_shards=verify_shards
    )


def delivered_and_listed(train: TrainStream) -> tuple[set[int], set[int], list]:
    """Keys trained on, keys listed as unusable, and the batches of one epoch of ``train``."""
    batches = list(train.iter_batches())
    assert len(batches) == train.plan().steps and not any(batch.report["error"] for batch in batches)
    delivered = {int(key) for batch in batches for key in batch.keys}
    listed = [bad["key"] for batch in batches for bad in batch.report["bad"]]
    assert len(listed) == len(set(listed))  # each listed once
    return delivered, set(listed), batches


def test_200_single_byte_flips_cost_at_most_the_sample_they_hit(converted_cifar, tmp_path):
    rng = random.Random(34)
    keys = set(ConvertedDataset(converted_cifar, "webdataset").keys.tolist())
    flips = listed_in_all = 0
    for round in range(ROUNDS):
        data = copy_dataset(converted_cifar, tmp_path / f"round{round}")
        changed, hit = flip_bytes(data, FLIPS, rng)
        problems = verify_dataset(data)[1]
        assert {problem.split(":")[0] for problem in problems if problem.startswith("shard-")} == changed
        first = next(stream(data, "first").iter_batches())  # the default check refuses the shard at once
        assert "does not match the SHA-256" in first.report["error"] and len(first.labels) == 0
        delivered, listed, _ = delivered_and_listed(stream(data))
        assert listed <= hit, (listed - hit, hit)  # a flip costs at most the sample it hits
        assert keys == delivered | listed  # nothing lost silently
        flips, listed_in_all = flips + FLIPS, listed_in_all + len(listed)
    # Every round above ran to its end, every sample delivered or listed (no stopped run, none lost).
    print(f"\nshard fuzz: {flips} flips, {listed_in_all} samples listed ({listed_in_all / flips:.2f} per flip)")
    assert flips >= 200 and listed_in_all <= flips


def test_a_run_over_flipped_shards_lists_what_it_skips_and_finishes(converted_cifar, tmp_path):
    data = copy_dataset(converted_cifar, tmp_path / "data")
    _, hit = flip_bytes(data, FLIPS, random.Random(3))
    _, listed, _ = delivered_and_listed(stream(data, batch_size=32))
    config = TrainConfig(
        arch="mobilenet_v3_small", stem="imagenet", input_size=32, batch_size=32, epochs=1, data_ratio=1.0,
        workers=1, rela="off", verify_shards="off", max_bad=1.0, storage="webdataset",
    )  # fmt: skip
    run = tmp_path / "run"
    summary = Trainer(data, run, config).fit(progress=False)
    skipped = [line for line in (run / "skipped.jsonl").read_text().splitlines() if line]
    assert summary["steps"] == 200 // 32 and summary["bad_samples"] == len(skipped) == len(listed) > 0
    assert listed <= hit


@pytest.fixture(scope="module")
def whole_batches_damaged(converted_cifar, tmp_path_factory) -> tuple[Path, list[list[int]]]:
    """``converted_cifar`` with every image of the second and of the last batch of the epoch (batches of
    :data:`BATCH`) undecodable (hashes recorded anew); returns the data and the keys of each epoch's batch."""
    batches = [batch.keys.tolist() for batch in stream(converted_cifar).iter_batches()]
    data = copy_dataset(converted_cifar, tmp_path_factory.mktemp("whole-batches") / "data")
    for key in batches[1] + batches[-1]:
        overwrite_member(data, key, "jpg", bytes(4096))
    return data, batches


def test_a_batch_without_a_usable_sample_trains_on_the_next_one(whole_batches_damaged):
    data, before = whole_batches_damaged
    delivered, listed, batches = delivered_and_listed(stream(data, "first"))
    assert listed == set(before[1] + before[-1])
    assert [bad["key"] for bad in batches[1].report["bad"]] == before[1]  # listed with its own step
    assert batches[1].keys.tolist() == before[2] and torch.equal(batches[1].view_1, batches[2].view_1)
    assert batches[-1].keys.tolist() == before[-2]  # the last one: the one before
    assert [batch.keys.tolist() for batch in batches[2:-1]] == before[2:-1]
    assert delivered | listed == {key for batch in before for key in batch}


def test_a_run_goes_on_past_a_batch_without_a_usable_sample_within_max_bad(whole_batches_damaged, tmp_path):
    data, before = whole_batches_damaged
    config = TrainConfig(
        arch="mobilenet_v3_small", stem="imagenet", input_size=32, batch_size=BATCH, epochs=1, data_ratio=1.0,
        workers=0, rela="off", max_bad=0.1, storage="webdataset",
    )  # fmt: skip
    run = tmp_path / "run"
    summary = Trainer(data, run, config).fit(progress=False)
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert summary["steps"] == 200 // BATCH and summary["bad_samples"] == len(skipped) == 2 * BATCH
    assert {record["key"] for record in skipped} == set(before[1] + before[-1])
    assert BATCH in Counter(record["step"] for record in skipped).values()  # a whole step's batch was unusable


def test_a_shard_of_jpeg_and_png_samples_reads_whole_and_a_damaged_header_costs_one(cifar_root, tmp_path):
    from PIL import Image

    from rela_convert.config import ConvertOptions
    from rela_convert.convert import convert
    from rela_convert.dataset.formats.webdataset import WebDataset

    tree = copy_images(cifar_root / "train", tmp_path / "tree", per_class=3, classes=2)
    for image in sorted(tree.rglob("*.jpg"))[1::2]:  # every other image a PNG (the first stored one too)
        Image.open(image).save(image.with_suffix(".png"))
        image.unlink()
    convert(tree, tmp_path / "data", f"cifar-resnet:20:{RESNET20}", ConvertOptions(workers=0, progress=False))
    shard = tmp_path / "data" / "shard-000000.tar"
    samples = list(WebDataset.iter_samples_tolerant(shard))
    assert len(samples) == 6 and not [sample for sample in samples if "error" in sample]
    assert {sample["ext"] for sample in samples} == {"jpg", "png"}
    second = [first for first, _, key in member_spans(shard) if key == samples[1]["key"]][0]
    data = bytearray(shard.read_bytes())
    data[second + 10] ^= 0xFF  # the name in the header of the second sample's first member
    shard.write_bytes(bytes(data))
    damaged = [sample["key"] for sample in WebDataset.iter_samples_tolerant(shard) if "error" in sample]
    assert damaged == [samples[1]["key"]]  # not the first sample, whose members are all there
