"""Regression guard (issue 4): conversion never holds more than a bounded number of feature rows.

Not a timing. Two views of the same promise (rela_convert/convert.py: "Memory does
not grow with N"):

1. Every feature block the prior returns is tracked with a finaliser; while a
   conversion runs, the rows still alive (held by the shard stream, samples,
   writers, or anything else) never exceed one shard plus one batch, and none
   survive the conversion.
2. Python-level allocations (``tracemalloc``, which sees numpy arrays, copies
   included) grow by far less than one feature row per image between a small
   and a 6x larger conversion (measured: about 500 B per image for listing
   entries, keys and records; a 1024-d float32 row is 4 KiB).

Both use real CIFAR-10 JPEGs, a TorchScript prior with wide (1024-d) features so
that a feature row (4 KiB) dwarfs everything else kept per image, small shards
and in-process decoding (``workers=0``: the prior runs in this process).
"""

from __future__ import annotations

import gc
import os
import tracemalloc
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from rela_convert.config import ConvertOptions
from rela_convert.convert import convert
from rela_convert.priors import Prior

FEATURE_DIM = 1024
SHARD_SIZE = 16
BATCH_SIZE = 8


class _WideFeatures(torch.nn.Module):
    """[B, 3, 32, 32] -> [B, 1024]: the first 1024 normalised pixel values (no weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :1024].contiguous()  # FEATURE_DIM (TorchScript cannot read a global)


@pytest.fixture(scope="module")
def wide_prior(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prior") / "wide.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still a documented prior format
        torch.jit.save(torch.jit.script(_WideFeatures()), str(path))
    return f"torchscript:{path}@32"


def _cifar_links(cifar_root: Path, target: Path, per_class: int, classes: int = 10) -> Path:
    """A class-folder tree of links to the first ``per_class`` train images of the first ``classes`` classes."""
    for folder in sorted((cifar_root / "train").iterdir())[:classes]:
        (target / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            os.symlink(image, target / folder.name / image.name)
    return target


def _options() -> ConvertOptions:
    return ConvertOptions(shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, workers=0, device="cpu", progress=False)


def test_feature_rows_alive_never_exceed_one_shard_and_one_batch(cifar_root, wide_prior, tmp_path, monkeypatch):
    source = _cifar_links(cifar_root, tmp_path / "src", per_class=20)  # 200 images, 13 shards
    alive = {"rows": 0, "max": 0, "blocks": 0}
    original = Prior.features

    def tracked(self, images):
        alive["max"] = max(alive["max"], alive["rows"])
        block = np.array(original(self, images).cpu().numpy(), dtype=np.float32, copy=True)
        rows = len(block)
        alive["rows"] += rows
        alive["blocks"] += 1
        weakref.finalize(block, lambda: alive.__setitem__("rows", alive["rows"] - rows))
        return torch.from_numpy(block)  # every view or row of the result keeps the block alive

    monkeypatch.setattr(Prior, "features", tracked)
    result = convert(source, tmp_path / "out", wide_prior, _options())
    gc.collect()

    assert result.num_samples == 200
    assert alive["blocks"] >= 200 // BATCH_SIZE  # the prior really ran through the tracked method
    assert alive["max"] <= SHARD_SIZE + BATCH_SIZE, (
        f"{alive['max']} feature rows alive at once (bound {SHARD_SIZE + BATCH_SIZE})"
    )
    assert alive["rows"] == 0, f"{alive['rows']} feature rows still alive after the conversion"


def _peak_traced_bytes(source: Path, out: Path, prior: str) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        convert(source, out, prior, _options())
        return tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()


def test_python_memory_grows_by_far_less_than_a_feature_row_per_image(cifar_root, wide_prior, tmp_path):
    small = _cifar_links(cifar_root, tmp_path / "small", per_class=5)  # 50 images
    large = _cifar_links(cifar_root, tmp_path / "large", per_class=30)  # 300 images
    one = _cifar_links(cifar_root, tmp_path / "one", per_class=1, classes=1)
    convert(
        one, tmp_path / "warm-up", wide_prior, _options()
    )  # imports and first-call caches, untraced (1 image: no PCA fit)
    peak_small = _peak_traced_bytes(small, tmp_path / "out-small", wide_prior)
    peak_large = _peak_traced_bytes(large, tmp_path / "out-large", wide_prior)

    row = FEATURE_DIM * 4
    growth_per_image = (peak_large - peak_small) / 250  # measured here: about 500 B
    # Listing entries, keys and shard records cost a few hundred bytes per image;
    # holding every feature row would cost at least 4 KiB more per image.
    assert growth_per_image < row / 4, (
        f"peak Python memory grows by {growth_per_image:.0f} B per image (small {peak_small} B, large {peak_large} B); "
        f"a feature row is {row} B"
    )
