"""Training as the reference does (issue 9, part 1 and 2): uniform batches from mixed shards, the fixed
transfer head, the training size from the data, the static rule, the reference's Rand. prior, the
linear probe, and a trained run used as a prior (the "gift")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import RESNET20, copy_images

from rela_convert.config import ConvertOptions
from rela_convert.convert import convert
from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.index import DatasetIndex
from rela_convert.priors import load_prior
from rela_train.config import TrainConfig
from rela_train.data.stream import TrainStream
from rela_train.evaluate import linear_probe_top1
from rela_train.methods.byol import BYOL
from rela_train.trainer import Trainer


@pytest.fixture(scope="module")
def cifar_5000(cifar_root, tmp_path_factory):
    """5,000 real CIFAR-10 train images (500 per class) converted with the real ResNet-20 prior into
    5 shards of 1,000: each shard is a fifth of the data, as a 5,000-sample shard of the full set."""
    out = tmp_path_factory.mktemp("cifar-5000") / "data"
    tree = copy_images(cifar_root / "train", tmp_path_factory.mktemp("cifar-5000-tree"), per_class=500)
    convert(
        tree,
        out,
        f"cifar-resnet:20:{RESNET20}",
        ConvertOptions(shard_size=1000, batch_size=250, workers=2, progress=False, formats=("hdf5",)),
    )
    return out


def _labels_by_feature(root) -> dict[bytes, int]:
    dataset = ConvertedDataset(root)
    return {
        sample["feature"].tobytes(): int(sample["label"])
        for shard in dataset.shards
        for sample in dataset.format.iter_samples(root / shard["name"])
    }


@pytest.mark.parametrize("batch_size", [32, 128])
@pytest.mark.parametrize("workers", [1, 2])
def test_batches_hold_as_many_classes_as_uniform_random_batches(cifar_5000, batch_size, workers):
    labels = _labels_by_feature(cifar_5000)
    stream = TrainStream(
        ConvertedDataset(cifar_5000),
        input_size=32,
        method_views=BYOL.views(32),
        data_ratio=0.5,
        seed=0,
        batch_size=batch_size,
    )
    stream.set_epoch(1)
    batches = [[labels[row.tobytes()] for row in features.numpy()] for _, _, features, _ in stream.loader(workers)]
    assert len(batches) == 2500 // batch_size
    distinct = np.mean([len(set(batch)) for batch in batches])
    # The same labels drawn as uniform random batches (the reference's shuffling DataLoader).
    everything = np.concatenate(batches)
    generator = np.random.default_rng(0)
    uniform = np.mean([len(set(generator.choice(everything, batch_size, replace=False))) for _ in range(2000)])
    assert distinct >= 0.95 * uniform, (distinct, uniform)


def _trainer(data, run, **options) -> Trainer:
    config = TrainConfig(**{"epochs": 2, "batch_size": 16, "data_ratio": 0.5, "workers": 0, "log_every": 1, **options})
    return Trainer(data, run, config)


def test_transfer_head_is_fixed_by_default_and_trainable_on_request(converted_cifar, tmp_path):
    for head, changes in (("fixed", False), ("trained", True)):
        trainer = _trainer(converted_cifar, tmp_path / head, rela="static:1", transfer_head=head, epochs=1)
        before = trainer.model.transfer.weight.detach().clone()
        backbone_before = trainer.model.method.backbone.conv1.weight.detach().clone()
        trainer.fit(progress=False)
        assert trainer.switch_step is None  # ReLA all along: only the ReLA loss moved the weights
        assert not torch.equal(trainer.model.method.backbone.conv1.weight, backbone_before)
        assert (not torch.equal(trainer.model.transfer.weight, before)) is changes
        assert all(p.requires_grad is changes for p in trainer.model.transfer.parameters())


def test_static_rule_is_int_of_c_times_epochs(converted_cifar, tmp_path):
    trainer = _trainer(converted_cifar, tmp_path / "run", rela="static:0.5", epochs=3)
    trainer.fit(progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    phases = {epoch: {line["phase"] for line in lines if line["epoch"] == epoch} for epoch in range(3)}
    assert phases == {0: {"rela"}, 1: {"ssl"}, 2: {"ssl"}}  # int(0.5 * 3) = 1 epoch of ReLA, not 1.5


def test_training_size_comes_from_the_data_not_the_prior(small_cifar_tree, tmp_path):
    data = tmp_path / "data"
    convert(
        small_cifar_tree, data, "rand:mobilenet_v3_small@96", ConvertOptions(shard_size=100, workers=0, progress=False)
    )
    assert DatasetIndex.load(data).prior["input_size"] == 96
    trainer = _trainer(data, tmp_path / "run")
    assert (trainer.config.input_size, trainer.config.stem) == (32, "cifar")
    assert _trainer(data, tmp_path / "other", input_size=48, stem="imagenet").config.input_size == 48


def test_target_init_prior_is_the_target_networks_own_initialisation(converted_cifar, tmp_path):
    prior = load_prior("target-init:resnet18:imagenet@32#3")
    assert (prior.input_size, prior.feature_dim, prior.seed) == (32, 512, 3)
    trainer = _trainer(converted_cifar, tmp_path / "run", seed=3, stem="imagenet")
    initial = trainer.model.method.backbone.state_dict()
    assert initial.keys() == prior.model.state_dict().keys()
    assert all(torch.equal(initial[name], value) for name, value in prior.model.state_dict().items())
    assert not torch.equal(
        load_prior("target-init:resnet18:imagenet@32#4").model.conv1.weight, prior.model.conv1.weight
    )
    assert load_prior("target-init:resnet18").model.conv1.kernel_size == (3, 3)  # 32 px, auto: the CIFAR stem


def test_a_trained_run_becomes_a_prior(converted_cifar, small_cifar_tree, tmp_path):
    run = tmp_path / "run"
    _trainer(converted_cifar, run, stem="imagenet").fit(progress=False)
    prior = load_prior(f"run:{run}")
    assert (prior.input_size, prior.feature_dim) == (32, 512)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(state["backbone"][name], value) for name, value in prior.model.state_dict().items())
    data = tmp_path / "gift"
    index = convert(small_cifar_tree, data, f"run:{run}", ConvertOptions(shard_size=100, workers=0, progress=False))
    assert index.num_samples == 200 and index.feature_dim == 512
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = prior.model(prior.normalize(pixels))
    assert torch.allclose(prior.features(pixels), expected)
    with pytest.raises(ValueError, match="does not exist"):
        load_prior(f"run:{tmp_path / 'missing'}")


def test_linear_probe_reports_mean_and_std_of_the_last_three_epochs():
    generator = np.random.default_rng(0)
    centres = generator.normal(size=(4, 16)) * 3
    labels = generator.integers(0, 4, 400)
    features = (centres[labels] + generator.normal(size=(400, 16))).astype(np.float32)
    mean, std = linear_probe_top1(features[:300], labels[:300], features[300:], labels[300:], epochs=30, lr=1e-2)
    assert mean > 0.9 and 0 <= std < 0.05
    mean_one, std_one = linear_probe_top1(features[:300], labels[:300], features[300:], labels[300:], epochs=1)
    assert std_one == 0.0 and mean_one < mean


def test_stems_and_their_feature_maps():
    from rela_convert.backbones import build_backbone, resolve_stem

    assert resolve_stem("auto", 32) == "cifar" and resolve_stem("auto", 224) == "imagenet"
    with pytest.raises(ValueError, match="unknown --stem"):
        resolve_stem("tiny", 32)
    images = torch.zeros(2, 3, 32, 32)
    for stem, kernel, layer1_size in (("cifar", 3, 32), ("cifar-pool", 3, 16), ("imagenet", 7, 8)):
        backbone, feature_dim = build_backbone("resnet18", 32, stem)
        assert backbone.conv1.kernel_size == (kernel, kernel) and feature_dim == 512
        with torch.no_grad():
            stem_output = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
            assert stem_output.shape[-1] == layer1_size
            assert backbone(images).shape == (2, 512)
