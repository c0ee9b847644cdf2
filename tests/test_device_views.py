"""Views made on the training device (``rela train --augment device``, :mod:`rela_train.device_views`) against the
CPU views (:mod:`rela_train.views`): one declaration per view, the same parameter distributions, the same pixels
for fixed parameters, deterministic per step, and tiny training runs. Real CIFAR-10 and ImageNet pictures; all on
the CPU."""

from __future__ import annotations

import json
import random
import signal

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
import torchvision.transforms.v2.functional as F
from click.testing import CliRunner
from conftest import encoded_pictures, stored_samples
from lightly.transforms import DINOViewTransform, SimCLRViewTransform, SimSiamViewTransform, VICRegViewTransform
from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.solarize import RandomSolarization
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import ImageFilter, ImageOps

from cli import main
from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.images import decode_rgb
from rela_train.config import TrainConfig
from rela_train.data.stream import TrainStream
from rela_train.device_views import (
    DeviceView,
    DeviceViews,
    ViewDraw,
    decode_for_device,
    decode_size,
    stack_decoded,
    step_seed,
)
from rela_train.draws import KeyedDraws
from rela_train.methods import METHODS
from rela_train.methods.byol import BYOL
from rela_train.views import BLUR_MIN_SIZE, ViewParams, blur_probability, rela_params, rela_view

VIEWS = ["rela", "barlowtwins", "byol", "dino", "moco", "simclr", "simsiam", "supervised", "vicreg"]


def view_params(name: str, size: int) -> tuple[ViewParams, ViewParams]:
    return (rela_params(size),) * 2 if name == "rela" else METHODS.get(name).view_params(size)


def lightly_views(name: str, size: int):
    """The views as the project declared them with lightly's (and torchvision's) transforms before
    :class:`ViewParams`: what the declarations must reproduce."""
    blur = blur_probability
    if name == "rela":
        view = BYOLView1Transform(
            input_size=size, min_scale=0.5, cj_bright=0.8, cj_contrast=0.8, cj_sat=0.8, cj_hue=0.2, gaussian_blur=0.0
        )
        return view, view
    if name in ("byol", "barlowtwins"):
        return (
            BYOLView1Transform(input_size=size, gaussian_blur=blur(size, 1.0)),
            BYOLView2Transform(input_size=size, gaussian_blur=blur(size, 0.1)),
        )
    if name == "dino":
        return (
            DINOViewTransform(crop_size=size, gaussian_blur=blur(size, 1.0), solarization_prob=0.0),
            DINOViewTransform(crop_size=size, gaussian_blur=blur(size, 0.1), solarization_prob=0.2),
        )
    if name == "moco":
        view = SimCLRViewTransform(
            input_size=size,
            cj_bright=0.4,
            cj_contrast=0.4,
            cj_sat=0.4,
            cj_hue=0.1,
            min_scale=0.2,
            gaussian_blur=blur(size, 0.5),
        )
        return view, view
    if name == "simclr":
        view = SimCLRViewTransform(input_size=size, gaussian_blur=blur(size, 0.5))
        return view, view
    if name == "simsiam":
        view = SimSiamViewTransform(input_size=size, gaussian_blur=blur(size, 0.5))
        return view, view
    if name == "vicreg":
        view = VICRegViewTransform(input_size=size, gaussian_blur=blur(size, 0.5))
        return view, view
    assert name == "supervised"
    if size < BLUR_MIN_SIZE:
        crop = [T.Resize(size), T.CenterCrop(size), T.RandomCrop(size, padding=size // 8)]
    else:
        crop = [T.RandomResizedCrop(size)]
    normalize = T.Normalize(IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"])
    view = T.Compose([*crop, T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    return view, view


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture(scope="module")
def pictures(cifar_root, imagenet_sample) -> dict:
    """Encoded bytes of 4 real CIFAR-10 train images (32 x 32) and 4 real ImageNet images (full size)."""
    return encoded_pictures(cifar_root, imagenet_sample, 4, 4)


# ----------------------------------------------------------------------------------------------------------------
# One declaration: the CPU views built from ViewParams are lightly's transforms


@pytest.mark.parametrize("size", [32, 96])
@pytest.mark.parametrize("name", VIEWS)
def test_cpu_views_built_from_the_declared_parameters_are_lightlys_bit_for_bit(pictures, name, size):
    declared = (rela_view(size), rela_view(size)) if name == "rela" else METHODS.get(name).views(size)
    reference = lightly_views(name, size)
    for index, data in enumerate(pictures["cifar"][:2] + pictures["imagenet"][:1]):
        picture = decode_rgb(data)
        for which in (0, 1):
            for seed in (index, 100 + index):
                seed_everything(seed)
                expected = reference[which](picture)
                seed_everything(seed)
                assert torch.equal(declared[which](picture), expected), (name, size, index, which)


def test_view_parameters_are_checked():
    for bad in (
        dict(flip_prob=1.5),
        dict(brightness=-0.1),
        dict(hue=0.6),
        dict(crop_scale=(0.5, 0.2)),
        dict(blur_sigmas=(0.0, 2.0)),
        dict(crop_padding=-1),
    ):
        with pytest.raises(ValueError):
            ViewParams(32, **bad)


# ----------------------------------------------------------------------------------------------------------------
# The same distributions


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    values = np.concatenate([a, b])
    return float(
        np.max(np.abs(np.searchsorted(a, values, "right") / len(a) - np.searchsorted(b, values, "right") / len(b)))
    )


#: KS threshold for 2,000 draws on each side: about the 0.1% critical value (1.95 sqrt(2 / 2000) = 0.062).
KS_LIMIT = 0.065
DRAWS = 2000


def stage(view, kind):
    return next(s for s in view.transform.transforms if isinstance(s, kind))


def cpu_draws(params: ViewParams, height: int, width: int) -> dict:
    """``DRAWS`` parameter draws of the CPU view's own transforms (their ``make_params``, what they call on every
    image) for a ``height x width`` picture."""
    view = params.cpu()
    seed_everything(0)
    image = torch.zeros(3, height, width)
    out = {}
    if params.crop_padding is None:
        crops = [stage(view, T2.RandomResizedCrop).make_params([image]) for _ in range(DRAWS)]
        out["crops"] = np.array([[c["top"], c["left"], c["height"], c["width"]] for c in crops])
    else:
        square = torch.zeros(3, params.input_size, params.input_size)
        crops = [
            stage(view, T.RandomCrop).get_params(F.pad(square, [params.crop_padding] * 4), [params.input_size] * 2)
            for _ in range(DRAWS)
        ]
        out["offsets"] = np.array([c[:2] for c in crops])
    if params.jitters:
        jitter = stage(view, T2.RandomApply).transforms[0]
        draws = [jitter.make_params([image]) for _ in range(DRAWS)]
        names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        identity = (1.0, 1.0, 1.0, 0.0)
        out["factors"] = np.array(
            [[d[n] if d[n] is not None else identity[i] for i, n in enumerate(names)] for d in draws]
        )
        out["first"] = np.array([int(d["fn_idx"][0]) for d in draws])
    if params.photometric:
        out["sigma"] = np.random.uniform(*stage(view, GaussianBlur).sigmas, DRAWS)
        out["p"] = {
            "flip": stage(view, T2.RandomHorizontalFlip).p,
            "jitter": stage(view, T2.RandomApply).p,
            "grey": stage(view, T2.RandomGrayscale).p,
            "blur": stage(view, GaussianBlur).prob,
            "solarize": stage(view, RandomSolarization).prob,
        }
    else:
        out["p"] = {"flip": stage(view, T.RandomHorizontalFlip).p}
    return out


@pytest.mark.parametrize(
    "name, which, height, width",
    [
        ("rela", 0, 32, 32),
        ("simclr", 0, 32, 32),
        ("byol", 1, 375, 500),
        ("dino", 1, 500, 333),
        ("vicreg", 0, 240, 240),
        ("moco", 0, 100, 600),  # a panorama: many crops fall back to the centre crop
        ("supervised", 0, 32, 32),
    ],
)
@pytest.mark.parametrize("draws", ["generator", "keyed"])  # --augment device / --augment dali
def test_device_parameter_draws_follow_the_cpu_distributions(name, which, height, width, draws):
    params = view_params(name, 224 if height > 32 else 32)[which]
    cpu = cpu_draws(params, height, width)
    sizes = torch.tensor([[height, width, height, width]]).repeat(DRAWS, 1)
    source = torch.Generator().manual_seed(1) if draws == "generator" else KeyedDraws(list(range(DRAWS)))
    draw = DeviceView(params).sample(sizes, source)
    if "crops" in cpu:
        device = draw.crops.numpy()
        for crops in (cpu["crops"], device):
            assert (crops[:, 2] >= 1).all() and (crops[:, 0] + crops[:, 2] <= height).all()
            assert (crops[:, 3] >= 1).all() and (crops[:, 1] + crops[:, 3] <= width).all()
        measures = {
            "scale": lambda c: c[:, 2] * c[:, 3] / (height * width),
            "log aspect": lambda c: np.log(c[:, 3] / c[:, 2]),
            "top": lambda c: (c[:, 0] + 0.5) / (height - c[:, 2] + 1),
            "left": lambda c: (c[:, 1] + 0.5) / (width - c[:, 3] + 1),
        }
        for measure, of in measures.items():
            a, b = of(cpu["crops"]), of(device)
            assert ks_statistic(a, b) < KS_LIMIT, (measure, ks_statistic(a, b))
            assert abs(a.mean() - b.mean()) <= 4 * ((a.var() + b.var()) / DRAWS) ** 0.5 + 1e-12, measure
    else:
        for axis in (0, 1):
            assert ks_statistic(cpu["offsets"][:, axis], draw.offsets[:, axis].numpy()) < KS_LIMIT
        assert set(draw.offsets.flatten().tolist()) == set(range(2 * params.crop_padding + 1))
    if "factors" in cpu:
        for column, factor in enumerate(("brightness", "contrast", "saturation", "hue")):
            ks = ks_statistic(cpu["factors"][:, column], draw.factors[:, column].numpy())
            assert ks < KS_LIMIT, (factor, ks)
        first = np.bincount(draw.order[:, 0].numpy(), minlength=4) / DRAWS
        assert np.abs(first - np.bincount(cpu["first"], minlength=4) / DRAWS).max() < 0.05
        assert np.abs(first - 0.25).max() < 0.04  # a jitter order per image, uniform
    if "sigma" in cpu:
        assert ks_statistic(cpu["sigma"], draw.sigma.numpy()) < KS_LIMIT
    drawn = {"flip": draw.flip, "jitter": draw.jitter, "grey": draw.grey, "blur": draw.blur, "solarize": draw.solarize}
    for what, probability in cpu["p"].items():
        rate = drawn[what].double().mean().item()
        assert abs(rate - probability) <= 4 * (probability * (1 - probability) / DRAWS) ** 0.5 + 1e-12, what


# ----------------------------------------------------------------------------------------------------------------
# The same pixels for fixed parameters


def one_draw(
    sizes: torch.Tensor, crop, flip=False, jitter=None, order=(0, 1, 2, 3), grey=False, blur=None, solarize=False
):
    """A :class:`ViewDraw` of one image with the given parameters (crop: top, left, height, width in source px)."""
    top, left, height, width = crop
    source_h, source_w, decoded_h, decoded_w = sizes.tolist()
    sx, sy = decoded_w / source_w, decoded_h / source_h
    box = [left * sx, top * sy, (left + width) * sx, (top + height) * sy]
    return ViewDraw(
        crops=torch.tensor([crop]),
        boxes=torch.tensor([box], dtype=torch.float64),
        offsets=None,
        flip=torch.tensor([flip]),
        jitter=torch.tensor([jitter is not None]),
        factors=torch.tensor([jitter or (1.0, 1.0, 1.0, 0.0)], dtype=torch.float64),
        order=torch.tensor([order]),
        grey=torch.tensor([grey]),
        blur=torch.tensor([blur is not None]),
        sigma=torch.tensor([blur or 1.0], dtype=torch.float64),
        solarize=torch.tensor([solarize]),
    )


def cpu_view_with(
    view, picture, crop, flip=False, jitter=None, order=(0, 1, 2, 3), grey=False, blur=None, solarize=False
):
    """The CPU view's own stages applied to a PIL picture with the given parameters instead of random ones."""
    top, left, height, width = crop
    image = stage(view, T2.RandomResizedCrop).transform(picture, dict(top=top, left=left, height=height, width=width))
    if flip:
        image = F.horizontal_flip(image)
    if jitter is not None:
        names = ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor")
        params = dict(zip(names, jitter), fn_idx=torch.tensor(order))
        image = stage(view, T2.RandomApply).transforms[0].transform(image, params)
    if grey:
        image = F.rgb_to_grayscale(image, num_output_channels=3)
    if blur is not None:  # lightly's GaussianBlur with this sigma
        image = image.filter(ImageFilter.GaussianBlur(radius=blur))
    if solarize:
        image = ImageOps.solarize(image, threshold=view.params.solarize_threshold)
    return F.pil_to_tensor(image).float() / 255


#: A view with every stage on, normalisation off (pixels compared in [0, 1]).
EVERY_STAGE = dict(
    brightness=0.8,
    contrast=0.8,
    saturation=0.8,
    hue=0.3,
    grey_prob=1.0,
    blur_prob=1.0,
    solarize_prob=1.0,
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
)

FIXED = [
    dict(),
    dict(flip=True),
    dict(flip=True, jitter=(1.3, 0.7, 1.4, 0.05), order=(2, 0, 3, 1)),
    dict(jitter=(0.6, 1.5, 0.3, -0.2), order=(3, 1, 0, 2)),
    dict(jitter=(1.1, 1.2, 0.0, 0.4), order=(1, 3, 2, 0), grey=True),
    dict(grey=True, solarize=True),
    dict(blur=1.5),
    dict(jitter=(0.9, 1.1, 1.2, 0.1), order=(0, 1, 2, 3), blur=0.7, solarize=True),
]


@pytest.mark.parametrize("fixed", FIXED, ids=[",".join(f) or "crop" for f in FIXED])
def test_device_pixels_match_the_cpu_view_for_fixed_parameters_on_cifar(pictures, fixed):
    # A crop box, enlarged to 32 px, as RandomResizedCrop makes them at 32 px
    params = ViewParams(32, **EVERY_STAGE)
    for data in pictures["cifar"]:
        pixels, sizes = stack_decoded([decode_for_device(data, decode_size(32))])
        device = DeviceView(params).apply(pixels.float() / 255, one_draw(sizes[0], (3, 5, 20, 24), **fixed))[0]
        cpu = cpu_view_with(params.cpu(), decode_rgb(data), (3, 5, 20, 24), **fixed)
        levels = (device - cpu).abs() * 255  # grey levels
        inside = levels[:, 1:-1, 1:-1]
        # Within the view: Pillow rounds to 8 bits after every stage, the device does not (worst seen: mean 1.6,
        # max 7.4 levels). On its border rows and columns roi_align samples the pixels just beyond the crop box
        # where Pillow's crop-then-resize repeats the box's edge (worst seen: 23 levels; mean of all 1.8).
        assert inside.mean() < 2 and inside.max() < 10, (inside.mean(), inside.max())
        assert levels.mean() < 2.5, levels.mean()


def test_device_pixels_are_close_to_the_cpu_view_on_full_size_imagenet_pictures(pictures):
    # Crops of 3/4 of a 500 px picture decoded at 2 x 224 = 448 px, shrunk to 224 px: the filters differ (roi_align's
    # box-averaged bilinear samples, Pillow's triangle) and the device resamples twice (worst seen: mean 4.3, 99th
    # percentile 19.5 levels).
    params = ViewParams(224, **EVERY_STAGE)
    for data in pictures["imagenet"][:2]:
        pixels, sizes = stack_decoded([decode_for_device(data, decode_size(224))])
        source_h, source_w = sizes[0, :2].tolist()
        crop = (source_h // 8, source_w // 8, source_h * 3 // 4, source_w * 3 // 4)
        for fixed in (dict(flip=True), dict(jitter=(1.3, 0.7, 1.4, 0.05), order=(2, 0, 3, 1)), dict(blur=1.5)):
            device = DeviceView(params).apply(pixels.float() / 255, one_draw(sizes[0], crop, **fixed))[0]
            cpu = cpu_view_with(params.cpu(), decode_rgb(data), crop, **fixed)
            levels = (device - cpu).abs() * 255
            assert levels.mean() < 6 and torch.quantile(levels, 0.99) < 25, (fixed, levels.mean())


def test_supervised_padded_crop_on_the_device_is_the_cpu_crop(pictures):
    params = METHODS.get("supervised").view_params(32)[0]
    cpu_view = params.cpu()
    for data in pictures["cifar"]:
        pixels, sizes = stack_decoded([decode_for_device(data, decode_size(32))])
        draw = DeviceView(params).sample(sizes, torch.Generator().manual_seed(0))
        draw.flip[:] = False
        top, left = draw.offsets[0].tolist()
        device = DeviceView(params).apply(pixels.float() / 255, draw)[0]
        padded = F.pad(F.pil_to_tensor(decode_rgb(data)), [params.crop_padding] * 4)
        expected = stage(cpu_view, T.Normalize)(padded[:, top : top + 32, left : left + 32].float() / 255)
        assert torch.allclose(device, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Decoding in the workers, whole batches on the device


def test_workers_decode_cifar_unchanged_and_shrink_large_pictures_keeping_their_shape(pictures):
    for data in pictures["cifar"]:
        pixels, sizes = decode_for_device(data, decode_size(32))
        assert torch.equal(pixels, F.pil_to_tensor(decode_rgb(data)))
        assert sizes.tolist() == [32, 32, 32, 32]
    decoded = [decode_for_device(data, decode_size(224)) for data in pictures["imagenet"]]
    for (pixels, sizes), data in zip(decoded, pictures["imagenet"]):
        width, height = decode_rgb(data).size
        assert sizes[:2].tolist() == [height, width] and pixels.shape[1:] == tuple(sizes[2:].tolist())
        assert max(pixels.shape[1:]) == min(448, max(height, width))
        assert abs(pixels.shape[1] / pixels.shape[2] - height / width) < 0.01
    batch, sizes = stack_decoded(decoded)
    assert batch.dtype == torch.uint8 and batch.shape[1:] == (3, max(s[2] for s in sizes), max(s[3] for s in sizes))
    for row, (pixels, _) in enumerate(decoded):
        h, w = pixels.shape[1:]
        assert torch.equal(batch[row, :, :h, :w], pixels)
        assert torch.equal(batch[row, :, h:, :w], pixels[:, -1:, :].expand(-1, batch.shape[2] - h, -1))
        assert torch.equal(batch[row, :, :, w:], batch[row, :, :, w - 1 : w].expand(-1, -1, batch.shape[3] - w))


@pytest.mark.parametrize("name", VIEWS)
def test_device_views_of_every_method_depend_only_on_their_seed(pictures, name):
    pixels, sizes = stack_decoded([decode_for_device(data, decode_size(32)) for data in pictures["cifar"]])
    views = DeviceViews((rela_params(32),) * 2, view_params(name, 32), torch.device("cpu"))
    for rela in (True, False):
        first = views(pixels, sizes, rela, seed=step_seed(0, 1, 2, 0))
        again = views(pixels, sizes, rela, seed=step_seed(0, 1, 2, 0))
        other = views(pixels, sizes, rela, seed=step_seed(0, 1, 3, 0))
        for view, same, different in zip(first, again, other):
            assert view.shape == (4, 3, 32, 32) and view.dtype == torch.float32 and torch.isfinite(view).all()
            assert torch.equal(view, same) and not torch.equal(view, different)
        assert not torch.equal(first[0], first[1])
    assert len({step_seed(0, epoch, step, rank) for epoch in (0, 1) for step in (0, 1) for rank in (0, 1)}) == 8


def test_the_stream_yields_decoded_batches_for_device_views(converted_cifar):
    stream = TrainStream(
        ConvertedDataset(converted_cifar), 32, BYOL.views(32), data_ratio=0.5, seed=0, batch_size=16, augment="device"
    )
    by_key = {sample["key"]: sample["image"] for sample in stored_samples(converted_cifar)}
    batch = next(iter(stream.loader(0, reports=True)))
    assert batch.view_1.dtype == torch.uint8 and batch.view_1.shape == (16, 3, 32, 32)
    assert batch.view_2.tolist() == [[32, 32, 32, 32]] * 16
    decoded = {F.pil_to_tensor(decode_rgb(image)).numpy().tobytes() for image in by_key.values()}
    assert all(picture.numpy().tobytes() in decoded for picture in batch.view_1)
    with pytest.raises(ValueError, match="augment"):
        TrainStream(ConvertedDataset(converted_cifar), 32, BYOL.views(32), 0.5, 0, 16, augment="gpu")


# ----------------------------------------------------------------------------------------------------------------
# rela train --augment device


@pytest.mark.parametrize("rela", ["adaptive", "off"])
def test_rela_train_with_device_views_finishes(converted_cifar, tmp_path, rela):
    run = tmp_path / "run"
    arguments = ["train", str(converted_cifar), str(run), "--augment", "device", "--epochs", "1", "--batch-size", "16"]
    arguments += ["--stem", "imagenet", "--input-size", "32", "--workers", "0", "--data-ratio", "0.5", "--rela", rela]
    result = CliRunner().invoke(main, [*arguments, "--no-tensorboard", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 100 // 16
    assert json.loads((run / "config.json").read_text())["augment"] == "device"


def test_a_killed_run_with_device_views_resumes_bit_identical(converted_cifar, tmp_path):
    from test_train_faults import STEPS, assert_same_weights, load_checkpoint, stop_after, train

    extra = ("--augment", "device")
    uninterrupted = tmp_path / "uninterrupted"
    train(converted_cifar, uninterrupted, *extra)  # 2 epochs, 2 workers, ReLA then BYOL
    run = tmp_path / "run"
    killed = stop_after(converted_cifar, run, STEPS + 2, signal.SIGKILL, "--save-every", "2", *extra)
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(run)["step"] >= 2
    train(converted_cifar, run, "--save-every", "2", *extra)
    assert_same_weights(run, load_checkpoint(uninterrupted)["training"]["model"])


def test_the_augment_option_is_part_of_a_runs_identity_unless_cpu():
    # Runs saved before --augment existed made their views on the CPU: their checkpoints record no augment
    assert "augment" not in TrainConfig(augment="cpu").identity()
    assert TrainConfig(augment="device").identity()["augment"] == "device"
