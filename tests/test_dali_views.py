"""Views made by NVIDIA DALI in the DataLoader workers (``rela train --augment dali``, :mod:`rela_train.dali_views`):
parameters drawn per image from its seed alone (:class:`rela_train.draws.KeyedDraws`, the same samplers as the
device views, whose draws ``tests/test_device_views.py`` compares with torchvision's), pixels against the device
views for the same parameters, undecodable pictures listed alone, and runs. Real CIFAR-10 and ImageNet pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import encoded_pictures, stored_samples
from test_device_views import VIEWS, view_params

from cli import main
from rela_convert.dataset.converted import ConvertedDataset
from rela_train.config import TrainConfig, resolve_augment
from rela_train.data.stream import TrainStream
from rela_train.device_views import DeviceView, decode_for_device, stack_decoded
from rela_train.draws import GeneratorDraws, KeyedDraws
from rela_train.methods import METHODS
from rela_train.methods.byol import BYOL
from rela_train.views import ViewParams, rela_params

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'rela[dali]')")

from rela_train.dali_views import DaliDecodeError, DaliViews  # noqa: E402


@pytest.fixture(scope="module")
def pictures(cifar_root, imagenet_sample) -> dict:
    """Encoded bytes of 8 real CIFAR-10 train images (32 x 32) and 6 real ImageNet images (full size)."""
    return encoded_pictures(cifar_root, imagenet_sample, 8, 6)


def test_keyed_draws_of_an_image_depend_on_its_seed_alone():
    together = KeyedDraws([7, 8, 9])
    apart = KeyedDraws([9, 7])
    for columns in (None, 10, 4):
        a, b = together.uniform(columns), apart.uniform(columns)
        assert torch.equal(a[[2, 0]], b) and ((a >= 0) & (a < 1)).all()
    assert together.uniform(4, torch.float32).dtype == torch.float32
    many = KeyedDraws(list(range(20000))).uniform(2)
    assert abs(many.mean().item() - 0.5) < 0.01 and abs(np.corrcoef(many[:, 0], many[:, 1])[0, 1]) < 0.03
    # The generator path gives torch.rand's numbers in torch.rand's order (the device views' draws are unchanged)
    drawn = GeneratorDraws(torch.Generator().manual_seed(3), 5).uniform(10)
    assert torch.equal(drawn, torch.rand(5, 10, generator=torch.Generator().manual_seed(3), dtype=torch.float64))


#: One stage at a time (normalisation on), and the mean |difference| allowed against the device view, grey levels.
STAGES = {
    "crop and flip": (dict(jitter_prob=0, grey_prob=0), 1.5),
    "brightness": (dict(jitter_prob=1, brightness=0.8, grey_prob=0), 1.5),
    "contrast": (dict(jitter_prob=1, contrast=0.8, grey_prob=0), 1.5),
    "saturation": (dict(jitter_prob=1, saturation=0.8, grey_prob=0), 1.5),
    # DALI-style hue: a rotation about the grey axis, linear in RGB (seen: 5.3 on CIFAR, 3.9 on ImageNet)
    "hue": (dict(jitter_prob=1, hue=0.2, grey_prob=0), 7.0),
    "greyscale": (dict(jitter_prob=0, grey_prob=1), 1.5),
    "blur": (dict(jitter_prob=0, grey_prob=0, blur_prob=1), 1.5),
    "solarisation": (dict(jitter_prob=0, grey_prob=0, solarize_prob=1), 1.5),
    # Pillow rounds and clips after every stage, the single affine map does not (seen: 4.3 on CIFAR, 3.2 on ImageNet)
    "every colour stage": (dict(jitter_prob=1, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2), 7.0),
}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("kind, size", [("cifar", 32), ("imagenet", 224)])
def test_dali_pixels_match_the_device_view_for_the_same_parameters(pictures, stage, kind, size):
    images = pictures[kind]
    params = ViewParams(size, **STAGES[stage][0])
    seeds = list(range(100, 100 + len(images)))
    view, _ = DaliViews(params, params, batch_size=8)(images, seeds)
    pixels, sizes = stack_decoded([decode_for_device(data, 10**6) for data in images])  # full size
    draw = DeviceView(params).sample(torch.cat([sizes[:, :2], sizes[:, :2]], 1), KeyedDraws(seeds))
    expected = DeviceView(params).apply(pixels.float() / 255, draw)
    assert view.shape == expected.shape == (len(images), 3, size, size) and view.dtype == torch.float32
    levels = ((view - expected) * torch.tensor(params.std)[:, None, None] * 255).abs()
    assert levels.mean() < STAGES[stage][1], levels.mean()


def test_dali_padded_crop_is_the_device_views_on_cifar(pictures):
    params = view_params("supervised", 32)[0]
    seeds = list(range(len(pictures["cifar"])))
    view, _ = DaliViews(params, params, batch_size=8)(pictures["cifar"], seeds)
    pixels, sizes = stack_decoded([decode_for_device(data, 64) for data in pictures["cifar"]])
    expected = DeviceView(params).apply(pixels.float() / 255, DeviceView(params).sample(sizes, KeyedDraws(seeds)))
    assert torch.allclose(view, expected, atol=1e-5)


@pytest.mark.parametrize("name", VIEWS)
def test_dali_views_of_every_method_are_a_function_of_each_images_seed(pictures, name):
    first, second = view_params(name, 32)
    views = DaliViews(first, second, batch_size=8)
    images = pictures["cifar"][:4]
    together = views(images, [11, 12, 13, 14])
    apart = views([images[3], images[1]], [14, 12])
    again = views(images, [11, 12, 13, 14])
    other = views(images, [21, 22, 23, 24])
    for view, part, same, different in zip(together, apart, again, other):
        assert view.shape == (4, 3, 32, 32) and torch.isfinite(view).all()
        assert torch.equal(view[[3, 1]], part) and torch.equal(view, same) and not torch.equal(view, different)
    assert not torch.equal(together[0], together[1])


def test_an_image_dali_cannot_decode_is_listed_alone_and_replaced(converted_cifar, pictures):
    with pytest.raises(DaliDecodeError, match="decode"):
        DaliViews(*view_params("rela", 224), batch_size=2)([pictures["imagenet"][0][:5000]], [1])
    stream = TrainStream(ConvertedDataset(converted_cifar), 32, BYOL.views(32), 0.5, 0, 16, augment="dali")
    chunk = [dict(sample, shard="shard-000000") for sample in stored_samples(converted_cifar)[:16]]
    truncated = pictures["imagenet"][1]
    chunk[5] = dict(chunk[5], image=truncated[: len(truncated) // 2])  # its header reads, its data is cut off
    report = {"bad": [], "verified": {}, "error": None}
    batch = stream._make_batch(chunk, report)
    assert [bad["key"] for bad in report["bad"]] == [chunk[5]["key"]] and report["error"] is None
    assert "corrupt or truncated image data (DALI" in report["bad"][0]["reason"]
    assert batch.view_1.shape == (16, 3, 32, 32) and batch.keys[5] == chunk[6]["key"]  # the next usable sample's
    clean = stream._make_batch(chunk[:5] + chunk[6:], {"bad": [], "verified": {}, "error": None})
    assert torch.equal(batch.view_1[:5], clean.view_1[:5])  # the others' views are their own


def test_auto_uses_dali_when_installed_and_runs_record_what_they_used(converted_cifar, tmp_path):
    assert resolve_augment("auto") == "dali" and resolve_augment("cpu") == "cpu"
    assert TrainConfig(augment="dali").identity()["augment"] == "dali"
    assert "augment" not in TrainConfig(augment="cpu").identity()  # runs saved before --augment: CPU views
    run = tmp_path / "run"
    arguments = ["train", str(converted_cifar), str(run), "--epochs", "1", "--batch-size", "16", "--workers", "2"]
    result = CliRunner().invoke(main, [*arguments, "--input-size", "32", "--no-tensorboard", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["augment"] == "dali"


@pytest.mark.parametrize("name", ["byol", "simclr", "supervised"])
def test_the_stream_makes_the_phases_dali_views_from_the_declared_parameters(converted_cifar, name):
    method_views = METHODS.get(name).views(32)
    stream = TrainStream(ConvertedDataset(converted_cifar), 32, method_views, 0.5, 0, 16, augment="dali")
    assert [view.params for view in stream._dali_views().views] == [rela_params(32)] * 2  # ReLA first
    stream.set_phase(False)
    assert [view.params for view in stream._dali_views().views] == [view.params for view in method_views]
    batch = next(iter(stream.loader(0, reports=True)))
    assert batch.view_1.shape == (16, 3, 32, 32) and batch.view_1.dtype == torch.float32 and not batch.report["bad"]
    with pytest.raises(ValueError, match="CPUView"):
        TrainStream(ConvertedDataset(converted_cifar), 32, (lambda image: image,) * 2, 0.5, 0, 16, augment="dali")
