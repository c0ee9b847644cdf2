"""timm models (issue 22): ``--arch timm:<name>`` trains a ViT at 32 px on real CIFAR-10, and a
``timm:<name>:<weights file>`` prior converts from a local file with the features the model itself computes;
bad specs, missing files, wrong weights and a missing timm fail with one line."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import stored_samples

from cli import main
from rela_convert.backbones import build_backbone, initial_backbone, parse_timm_arch, resolve_stem
from rela_convert.config import ConvertOptions
from rela_convert.convert import convert
from rela_convert.dataset.index import DatasetIndex
from rela_convert.images import prior_pixels
from rela_convert.optional import MissingDependency
from rela_convert.priors import PriorSpecError, load_prior

timm = pytest.importorskip("timm")

NAME = "vit_tiny_patch16_224"
ARCH = f"timm:{NAME},patch_size=4"  # ViT-Tiny with 4x4 patches: 8x8 tokens at 32 px, D 192


def timm_model(seed: int, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(NAME, pretrained=False, **options).eval()


def test_vit_backbone_is_timm_create_model_at_the_input_size():
    backbone, dim = build_backbone(ARCH, 32)
    assert dim == 192 and backbone.training
    features = backbone(torch.randn(4, 3, 32, 32))
    assert features.shape == (4, 192) and features.dtype == torch.float32
    reference = timm_model(0, num_classes=0, img_size=32, patch_size=4)
    ours, _ = initial_backbone(ARCH, 32, "auto", seed=0)
    assert reference.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), ours.state_dict().values()))
    # The target-init: prior (the reference's Rand. prior) is that same network.
    for spec in (f"target-init:{ARCH}@32#0", f"target-init:{ARCH}:imagenet@32"):
        prior = load_prior(spec)
        assert (prior.input_size, prior.feature_dim) == (32, 192) and torch.equal(prior.model.pos_embed, ours.pos_embed)
    # A model that takes no img_size (a CNN) is built without it; timm models keep their own stem.
    assert build_backbone("timm:resnet18", 32)[1] == 512
    assert resolve_stem("auto", 32, ARCH) == "imagenet"
    assert parse_timm_arch("timm:vit_small_patch16_224.augreg_in21k,patch_size=4,drop_path_rate=0.1") == (
        "vit_small_patch16_224.augreg_in21k",
        {"patch_size": 4, "drop_path_rate": 0.1},
    )


@pytest.mark.parametrize(
    "arch, stem, expected",
    [
        (ARCH, "cifar", "has no CIFAR stem (only its own) (timm models keep their own stem"),
        (ARCH, "cifar-pool", "has no CIFAR stem"),
        ("timm:no_such_model", "auto", "unknown timm model 'no_such_model'; see timm.list_models()"),
        (f"timm:{NAME},pretrained=True", "auto", "may not set pretrained"),
        (f"timm:{NAME},patch_size", "auto", "is not <key>=<value>"),
        ("timm:", "auto", "expected timm:<name>"),
    ],
)
def test_bad_timm_arch_is_one_line(arch, stem, expected):
    with pytest.raises(ValueError) as caught:
        build_backbone(arch, 32, stem)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_missing_timm_names_the_extra(monkeypatch, tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "timm", None)  # how Python marks a module as not importable
    for make in (lambda: build_backbone(ARCH, 32), lambda: load_prior(f"timm:{NAME}:{weights}@32")):
        with pytest.raises(MissingDependency, match=r"needs the optional module 'timm'.*: pip install 'rela\[timm\]'$"):
            make()


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    """A freshly initialised ViT-Tiny (4x4 patches, 32 px) with a 10-class head, saved with torch.save."""
    model = timm_model(7, num_classes=10, img_size=32, patch_size=4)
    path = tmp_path_factory.mktemp("timm-weights") / "vit.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.fixture(scope="module")
def timm_converted(small_cifar_tree, vit_weights, tmp_path_factory):
    """The 200 real CIFAR-10 images converted with the ``timm:`` prior of ``vit_weights`` at 32 px."""
    out = tmp_path_factory.mktemp("timm-converted") / "data"
    spec = f"timm:{NAME},patch_size=4:{vit_weights[1]}@32"
    convert(small_cifar_tree, out, spec, ConvertOptions(shard_size=64, batch_size=50, workers=0, progress=False))
    return out


def test_timm_prior_converts_with_the_models_own_features(timm_converted, vit_weights):
    model, path = vit_weights
    index = DatasetIndex.load(timm_converted)
    assert index.num_samples == 200 and index.feature_dim == 192
    assert index.prior["input_size"] == 32 and index.prior["mean"] == [0.5] * 3 and index.prior["std"] == [0.5] * 3
    assert index.prior["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    samples = stored_samples(timm_converted)[:16]
    pixels = torch.stack([prior_pixels(sample["image"], 32) for sample in samples])
    with torch.inference_mode():  # timm's own pre-logits feature, normalised with timm's mean and std (0.5)
        expected = model.forward_head(model.forward_features((pixels.float() / 255 - 0.5) / 0.5), pre_logits=True)
    stored = torch.from_numpy(np.stack([sample["feature"] for sample in samples]))
    assert stored.shape == (16, 192) and stored.dtype == torch.float32
    assert torch.allclose(stored, expected, atol=1e-5, rtol=1e-4)


def test_timm_prior_from_safetensors_uses_timms_data_config(tmp_path, small_cifar_tree):
    safetensors = pytest.importorskip("safetensors.torch")
    model = timm_model(1, num_classes=0)  # no head, timm's own 224 px
    safetensors.save_file(model.state_dict(), str(tmp_path / "vit.safetensors"))
    prior = load_prior(f"timm:{NAME}:{tmp_path / 'vit.safetensors'}")
    assert (prior.input_size, prior.feature_dim, prior.mean, prior.std) == (224, 192, (0.5,) * 3, (0.5,) * 3)
    images = sorted((small_cifar_tree / "cat").iterdir())[:2]
    pixels = torch.stack([prior_pixels(image.read_bytes(), 224) for image in images])
    with torch.inference_mode():
        expected = model((pixels.float() / 255 - 0.5) / 0.5)
    assert torch.allclose(prior.features(pixels), expected, atol=1e-5, rtol=1e-4)


def test_bad_timm_priors_are_one_line(tmp_path, vit_weights):
    _, path = vit_weights
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "resnet18.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    cases = [
        (f"timm:{NAME}", "expected timm:<name>[,<key>=<value>...]:<weights file>[@px]"),
        (f"timm:{NAME}:{tmp_path / 'missing.pt'}", "does not exist; give the path of a local file"),
        (f"timm:no_such_model:{path}", "unknown timm model 'no_such_model'"),
        (f"timm:{NAME}:{tmp_path / 'garbage.pt'}", "cannot read"),
        (f"timm:{NAME},patch_size=4:{tmp_path / 'resnet18.pt'}@32", "missing keys: cls_token, pos_embed"),
        (f"timm:{NAME},patch_size=4:{tmp_path / 'resnet18.pt'}@32", "unexpected keys: conv1.weight"),
        (f"timm:{NAME}:{path}@32", "shape mismatch: pos_embed [1, 65, 192] in the file, [1, 5, 192] in the model"),
    ]
    for spec, expected in cases:
        with pytest.raises(PriorSpecError) as caught:
            load_prior(spec)
        message = str(caught.value)
        assert expected in message and "\n" not in message, (spec, message)


def test_timm_vit_trains_at_32_px(timm_converted, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(timm_converted), str(run), "--arch", ARCH, "--epochs", "2", "--batch-size", "16"]
    args += ["--data-ratio", "0.25", "--workers", "0", "--log-every", "1", "--rela", "static:0.5", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = 50 // 16  # floor(0.25 x 200 samples) // batch
    assert [line["step"] for line in lines] == list(range(1, 2 * steps_per_epoch + 1))
    assert {line["phase"] for line in lines} == {"rela", "ssl"}
    assert all(np.isfinite(line["loss"]) for line in lines)
    config = json.loads((run / "config.json").read_text())
    assert (config["arch"], config["stem"], config["input_size"]) == (ARCH, "imagenet", 32)
    # The trained ViT serves as a prior in turn (run:), rebuilt from its checkpoint.
    gift = load_prior(f"run:{run}")
    assert (gift.input_size, gift.feature_dim) == (32, 192)
    other = ["train", str(timm_converted), str(tmp_path / "other"), "--arch", ARCH, "--stem", "cifar"]
    other += ["--batch-size", "16", "--workers", "0", "--quiet"]
    refused = CliRunner().invoke(main, other)
    assert refused.exit_code != 0 and "has no CIFAR stem" in refused.output
