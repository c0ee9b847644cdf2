"""Extending rela through its registries: a prior and a subset strategy defined here, in the test file
only, run through the real conversion and training on real CIFAR-10 images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from rela_convert.config import ConvertOptions
from rela_convert.convert import convert
from rela_convert.dataset.formats import STORAGE_FORMATS
from rela_convert.dataset.index import DatasetIndex
from rela_convert.dataset.subset import SUBSET_STRATEGIES, load_strategy, register_strategy, subset_size
from rela_convert.images import prior_pixels
from rela_convert.priors import IMAGENET_MEAN, IMAGENET_STD, PRIORS, Prior, PriorSpecError, load_prior, register_prior
from rela_convert.selection import select
from rela_train.config import TrainConfig
from rela_train.trainer import Trainer


class PixelProjection(nn.Module):
    """A fixed random projection of 8x8 average-pooled pixels: ``[B, 3, S, S]`` -> ``[B, dim]``."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(3 * 8 * 8, dim, generator=generator) / 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images, 8).flatten(1) @ self.weight


def pixel_projection(args: list[str], spec: str) -> Prior:
    """pixel-projection[:<dim>]: a fixed random projection of 8x8-pooled pixels (32 px, 16-d by default)."""
    dim = int(args[0]) if args else 16
    return Prior(spec, PixelProjection(dim, seed=7).eval(), 32, IMAGENET_MEAN, IMAGENET_STD, dim, seed=7)


def every_other(keys, data_ratio, seed, epoch, selection, sharpness):
    """every-other: every second key of the dataset (sorted), whatever the ratio, seed and epoch."""
    assert selection is None  # declared needs_selection=False
    return np.sort(keys)[::2]


@pytest.fixture
def registries():
    """Registries as they were before the test: what a test registers does not leak into other tests."""
    saved = {}
    for registry in (PRIORS, SUBSET_STRATEGIES):
        registry.names()  # registers the built-ins first
        saved[registry] = dict(registry._entries)
    yield
    for registry, entries in saved.items():
        registry._entries.clear()
        registry._entries.update(entries)


def test_a_prior_and_a_strategy_defined_outside_the_package_convert_and_train(small_cifar_tree, tmp_path, registries):
    register_prior("pixel-projection")(pixel_projection)
    register_strategy("every-other", needs_selection=False)(every_other)
    assert PRIORS.names()[-1] == "pixel-projection" and SUBSET_STRATEGIES.names()[-1] == "every-other"

    out = tmp_path / "data"
    index = convert(
        small_cifar_tree,
        out,
        "pixel-projection:12",
        ConvertOptions(shard_size=64, batch_size=50, workers=0, progress=False),
    )
    assert index.num_samples == 200 and index.feature_dim == 12 and index.prior["spec"] == "pixel-projection:12"
    sources = sorted(small_cifar_tree.rglob("*.jpg"))  # keys are positions in the sorted listing
    prior = load_prior("pixel-projection:12")
    for shard in index.shards("webdataset"):  # the stored features are the new prior's
        keys, features = STORAGE_FORMATS.get("webdataset").read_features(out / shard["name"])
        pixels = torch.stack([prior_pixels(sources[key].read_bytes(), 32) for key in keys])
        assert np.allclose(features, prior.features(pixels).numpy(), rtol=1e-5, atol=1e-6)

    trainer = Trainer(
        out,
        tmp_path / "run",
        TrainConfig(
            subset="every-other", arch="resnet18", stem="imagenet", input_size=32, batch_size=16, epochs=1, workers=0
        ),
    )
    chosen = np.arange(0, 200, 2)
    plan = trainer.stream.plan()
    assert len(plan.keys) == 96 and len(np.unique(plan.keys)) == 96  # 6 whole steps of 16 from the 100 drawn
    assert np.isin(plan.keys, chosen).all()  # trained on the new strategy's keys only
    assert trainer.fit(progress=False)["steps"] == 6

    select(out, "every-other")  # recorded as the dataset's default without computing a selection
    index = DatasetIndex.load(out)
    assert index.subset["strategy"] == "every-other" and "selection" not in index.subset
    assert np.array_equal(load_strategy(out, index).draw(np.load(out / "keys.npy"), 0.5, 0, 3), chosen)
    assert subset_size(200, 0.5) == 100


def test_registered_names_show_in_errors_and_fields_split_the_spec(registries):
    seen = []

    def pair(args: list[str], spec: str) -> Prior:
        """pair:<a>:<b>: a test prior taking two fields."""
        seen.append(args)
        return Prior(spec, nn.Identity(), 32, IMAGENET_MEAN, IMAGENET_STD, 3 * 32 * 32)

    register_prior("pair", fields=2)(pair)
    load_prior("pair:a:b:c")  # the last field keeps further colons (a file path)
    load_prior("pair")
    assert seen == [["a", "b:c"], []]
    with pytest.raises(PriorSpecError, match=r"unknown prior kind 'nope' in 'nope:1'; use one of rand, .*, pair$"):
        load_prior("nope:1")
    with pytest.raises(ValueError, match="already registered"):
        register_prior("pair")(pixel_projection)
    with pytest.raises(ValueError, match=r"unknown subset strategy 'nope'; choose one of random, dedup"):
        load_strategy("unused", None, "nope")
