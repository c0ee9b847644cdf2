"""Stage 2: the switch rule, subset draws, kNN accuracy of a real prior, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import RESNET20, copy_images
from torch.utils.data import DataLoader

from cli import main
from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.subset import draw_random, subset_size
from rela_convert.images import prior_pixels
from rela_convert.priors import load_prior
from rela_train.data.plan import EpochPlan
from rela_train.data.stream import TrainStream
from rela_train.evaluate import knn_top1
from rela_train.methods.byol import BYOL
from rela_train.rela import AdaptiveSwitch, parse_rela, rela_loss


def first_switch(losses) -> int | None:
    switch = AdaptiveSwitch()
    for step, loss in enumerate(losses, start=1):
        switch.update(loss)
        if switch.switched:
            return step
    return None


def test_switch_waits_for_plateau():
    # Steadily falling ReLA loss for 3,000 steps, then flat.
    falling = 1.0 - 2e-4 * np.arange(3000)
    flat = np.full(6000, falling[-1])
    step = first_switch(np.concatenate([falling, flat]))
    assert step is not None
    assert 3000 < step < 6000


def test_switch_never_happens_while_loss_keeps_falling():
    assert first_switch(1.0 - 2e-4 * np.arange(4000)) is None


def test_rho_follows_reference_formula():
    switch = AdaptiveSwitch()
    assert switch.rho is None and switch.update(0.5) is False
    assert switch.rho == pytest.approx(np.exp(-1.0))  # rho from the initial L_slow=2, L_fast=1
    assert switch.fast == pytest.approx(0.999 + 0.0005)
    assert switch.slow == pytest.approx(0.99 * 2 + 0.01 * switch.fast)


def test_parse_rela():
    assert parse_rela("adaptive") == ("adaptive", 0.0)
    assert parse_rela("static:0.3") == ("static", 0.3)
    assert parse_rela("off") == ("off", 0.0)
    assert parse_rela("guarded") == ("guarded", 1.0) and parse_rela("guarded:0.5") == ("guarded", 0.5)
    for bad in ("static:2", "static:x", "on"):
        with pytest.raises(ValueError):
            parse_rela(bad)


def test_rela_loss_is_zero_on_targets_and_one_when_orthogonal():
    targets = torch.randn(8, 16)
    assert rela_loss(targets * 3, targets * 0.5, targets).item() == pytest.approx(0.0, abs=1e-6)
    orthogonal = torch.zeros(8, 16)
    orthogonal[:, 0] = 1.0
    targets[:, 0] = 0.0
    assert rela_loss(orthogonal, orthogonal, targets).item() == pytest.approx(1.0, abs=1e-6)


def test_subset_draws():
    keys = np.arange(0, 30_000, 3, dtype=np.int64)  # keys with gaps, as after skipped files
    first = draw_random(keys, 0.1, seed=0, epoch=0)
    assert len(first) == subset_size(len(keys), 0.1) == 1000
    assert len(np.unique(first)) == 1000 and np.isin(first, keys).all()
    assert np.array_equal(first, draw_random(keys, 0.1, seed=0, epoch=0))
    second = draw_random(keys, 0.1, seed=0, epoch=1)
    assert not np.array_equal(first, second)
    assert len(np.intersect1d(first, second)) < 300  # about 10% overlap expected for independent draws
    assert not np.array_equal(first, draw_random(keys, 0.1, seed=1, epoch=0))


def test_knn_accuracy_of_real_prior_is_far_above_chance(cifar_root, tmp_path):
    prior = load_prior(f"cifar-resnet:20:{RESNET20}")

    def features(split, per_class):
        paths = sorted((cifar_root / split).glob("*/*.jpg"))
        by_class = {}
        for path in paths:
            by_class.setdefault(path.parent.name, []).append(path)
        chosen = [(label, path) for label, name in enumerate(sorted(by_class)) for path in by_class[name][:per_class]]
        pixels = torch.stack([prior_pixels(path.read_bytes(), 32) for _, path in chosen])
        vectors = torch.nn.functional.normalize(prior.features(pixels), dim=1).numpy()
        return vectors, np.array([label for label, _ in chosen])

    train_x, train_y = features("train", 100)
    test_x, test_y = features("test", 30)
    accuracy = knn_top1(train_x, train_y, test_x, test_y, k=200, temperature=0.1)
    assert accuracy > 0.5  # chance is 0.1


@pytest.fixture(scope="module")
def converted(converted_cifar):
    return converted_cifar


def test_epoch_plan_splits_the_subset_evenly_across_ranks_and_workers():
    keys = np.arange(0, 3 * 1000, 3, dtype=np.int64)  # 1,000 samples with key gaps
    shard_sizes = [128] * 7 + [104]
    world, workers, batch = 2, 3, 16
    plan = EpochPlan.make(keys, shard_sizes, 0.5, seed=0, epoch=2, world=world, batch_size=batch)
    assert plan.steps == 500 // (world * batch) == 15
    subset = set(draw_random(keys, 0.5, 0, 2).tolist())
    shares = []
    for rank in range(world):
        rank_keys = []
        for worker in range(workers):
            share, shards = plan.share(rank, world, worker, workers, batch)
            assert len(share) % batch == 0
            starts = np.concatenate([[0], np.cumsum(shard_sizes)])
            holding = {int(np.searchsorted(starts, np.flatnonzero(keys == key)[0], "right") - 1) for key in share}
            assert holding == set(shards)  # a worker reads exactly the shards holding its keys
            rank_keys.extend(share.tolist())
        assert len(rank_keys) == plan.steps * batch  # every rank runs the same number of steps
        shares.append(rank_keys)
    everything = [key for share in shares for key in share]
    assert len(set(everything)) == len(everything) == world * plan.steps * batch  # each sample once per epoch
    assert set(everything) <= subset and len(subset) - len(everything) < world * batch
    other = EpochPlan.make(keys, shard_sizes, 0.5, seed=0, epoch=3, world=world, batch_size=batch)
    assert not np.array_equal(plan.keys, other.keys)
    with pytest.raises(ValueError, match="less than one step"):
        EpochPlan.make(keys, shard_sizes, 0.01, seed=0, epoch=0, world=world, batch_size=batch)


def epoch_features(dataset, workers):
    """Prior features of every sample one epoch yields, through a DataLoader with ``workers``."""
    stream = TrainStream(dataset, input_size=32, method_views=BYOL.views(32), data_ratio=0.25, seed=0, batch_size=10)
    stream.set_epoch(3)
    batches = list(DataLoader(stream, batch_size=10, num_workers=workers, drop_last=True))
    for view_1, view_2, _, labels in batches:
        assert labels.dtype == torch.int64 and labels.min() >= 0
        assert view_1.shape == view_2.shape == (10, 3, 32, 32) and view_1.dtype == torch.float32
        assert not torch.equal(view_1, view_2)
    return sorted(tuple(row) for _, _, features, _ in batches for row in features.numpy().tolist())


def test_stream_yields_the_epoch_subset_in_both_formats(converted):
    dataset = ConvertedDataset(converted, "webdataset")
    features = epoch_features(dataset, workers=2)
    assert len(features) == len(set(features)) == subset_size(dataset.num_samples, 0.25) == 50
    assert len(features[0]) == dataset.index.feature_dim
    assert epoch_features(ConvertedDataset(converted, "hdf5"), workers=0) == features


def test_end_to_end_cli(converted, cifar_root, tmp_path):
    runner = CliRunner()
    run = tmp_path / "run"
    args = [
        "train",
        str(converted),
        str(run),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--data-ratio",
        "0.5",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--quiet",
    ]
    result = runner.invoke(main, args + ["--rela", "static:0.5"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = 100 // 16  # floor(0.5 x 200 samples) // batch
    assert [line["step"] for line in lines] == list(range(1, 2 * steps_per_epoch + 1))
    assert {line["phase"] for line in lines if line["epoch"] == 0} == {"rela"}
    assert {line["phase"] for line in lines if line["epoch"] == 1} == {"ssl"}
    assert all(line["rela_loss"] is None for line in lines if line["phase"] == "ssl")
    assert json.loads((run / "summary.json").read_text())["switch_step"] == steps_per_epoch
    config = json.loads((run / "config.json").read_text())
    assert config["input_size"] == 32 and config["rela"] == "static:0.5"

    # Running the finished command again is a no-op; other options into the same RUN are refused.
    again = runner.invoke(main, args + ["--rela", "static:0.5"])
    assert again.exit_code == 0 and "nothing to do" in again.output
    refused = runner.invoke(main, args + ["--rela", "off"])
    assert refused.exit_code != 0 and "other options" in refused.output
    assert "rela: 'static:0.5' there, 'off' now" in refused.output  # what differs is named

    test_dir = copy_images(cifar_root / "test", tmp_path / "test", per_class=5)
    train_dir = copy_images(cifar_root / "train", tmp_path / "train", per_class=10)
    evaluated = runner.invoke(
        main,
        [
            "eval",
            str(run),
            "--train-dir",
            str(train_dir),
            "--test-dir",
            str(test_dir),
            "--json",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.output)
    assert metrics["num_train"] == 100 and metrics["num_test"] == 50 and metrics["k"] == 200
    assert 0.0 <= metrics["knn_top1"] <= 1.0


def test_cosine_lr_schedule_decays_per_step_and_is_part_of_the_run(converted, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(converted), str(run), "--epochs", "2", "--batch-size", "16", "--data-ratio", "0.5"]
    args += ["--workers", "0", "--log-every", "1", "--stem", "imagenet", "--arch", "mobilenet_v3_small", "--quiet"]
    result = CliRunner().invoke(main, [*args, "--lr", "0.002", "--lr-schedule", "cosine"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    total = 2 * (100 // 16)  # 2 epochs of floor(0.5 x 200 samples) // batch 16
    assert [line["step"] for line in lines] == list(range(1, total + 1))
    expected = [0.001 * (1 + np.cos(np.pi * (line["step"] - 1) / total)) for line in lines]  # step N used lr_at(N - 1)
    assert [line["lr"] for line in lines] == pytest.approx(expected)
    assert lines[0]["lr"] == pytest.approx(0.002) and lines[-1]["lr"] < 0.002 * 0.02
    assert json.loads((run / "config.json").read_text())["lr_schedule"] == "cosine"
    refused = CliRunner().invoke(main, [*args, "--lr", "0.002"])  # the constant schedule is another run
    assert refused.exit_code != 0 and "other options" in refused.output
