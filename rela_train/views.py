"""The training views' parameters, the CPU views built from them, and the evaluation view.

Every training view is declared once as a :class:`ViewParams` (ReLA's in :func:`rela_params`, each
method's in its ``view_params``, :mod:`rela_train.methods`). Both pipelines are built from that one
declaration, so they cannot drift apart:

- the CPU view (``--augment cpu``, DataLoader workers, one PIL image at a time): :meth:`ViewParams.cpu`,
  lightly's transform pipeline (torchvision v2 transforms, lightly's ``GaussianBlur`` and
  ``RandomSolarization``, in lightly's order), bit-identical to lightly's own ``BYOLView1Transform``,
  ``SimCLRViewTransform``, ``DINOViewTransform``, ... with the same parameters (``tests/test_device_views.py``);
- the device view (``--augment device``, whole batches on the training device):
  :class:`rela_train.device_views.DeviceView`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torchvision.transforms as T
from lightly.transforms.gaussian_blur import GaussianBlur
from lightly.transforms.rotation import random_rotation_transform
from lightly.transforms.solarize import RandomSolarization
from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T2
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch import Tensor

#: Gaussian blur is left out at or below this input size (the usual CIFAR / Tiny-ImageNet practice).
BLUR_MIN_SIZE = 65

#: A view: an RGB PIL image -> float32 ``[3, S, S]``.
View = Callable[[Image.Image], Tensor]

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_NORMALIZE["mean"])
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_NORMALIZE["std"])


@dataclass(frozen=True)
class ViewParams:
    """One training view's augmentations, in the order they are applied (lightly's order).

    Attributes:
        input_size: S, the view's side, pixels.
        crop_scale: random resized crop: (min, max) fraction of the image area kept.
        crop_ratio: random resized crop: (min, max) aspect ratio (width / height) of the crop.
        crop_padding: None: a random resized crop (``crop_scale``, ``crop_ratio``); an int p: the
            supervised small-image crop instead: shorter side resized to S, centre ``S x S`` crop, then a
            random ``S x S`` crop of it padded by p black pixels on every side (He et al. 2016).
        bicubic: interpolation of the random resized crop on the CPU: bicubic (DINO) instead of bilinear
            (the device view is always bilinear, antialiased).
        flip_prob: probability of a horizontal flip.
        jitter_prob: probability that colour jitter is applied.
        brightness, contrast, saturation: jitter strengths b: a factor drawn uniformly from
            ``[max(0, 1 - b), 1 + b]`` (0: that adjustment is left out).
        hue: jitter strength h: a hue shift drawn uniformly from ``[-h, h]`` turns (h <= 0.5; 0: left out).
        grey_prob: probability of greyscale (ITU-R 601 luma, 3 channels).
        blur_prob: probability of a Gaussian blur with a standard deviation drawn uniformly from
            ``blur_sigmas``, pixels of the S px view.
        blur_sigmas: (min, max) blur standard deviation, pixels.
        solarize_prob: probability of solarisation (values >= ``solarize_threshold`` / 255 inverted).
        solarize_threshold: solarisation threshold, grey levels 0-255.
        solarize_first: solarise before the blur (lightly's VICReg view) instead of after it.
        mean, std: per-channel normalisation, applied last to values in [0, 1].

    The jitter adjustments run in a random order drawn per image (torchvision's ``ColorJitter``).

    Raises:
        ValueError: a probability outside [0, 1], a negative strength, a hue strength above 0.5, an
            empty or reversed range, or a view side below 1 px.
    """

    input_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_padding: int | None = None
    bicubic: bool = False
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    grey_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigmas: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    solarize_threshold: int = 128
    solarize_first: bool = False
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.input_size < 1:
            raise ValueError(f"a view is at least 1 px, not {self.input_size}")
        for name in ("flip_prob", "jitter_prob", "grey_prob", "blur_prob", "solarize_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], not {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                raise ValueError(f"jitter strength {name} must be >= 0, not {getattr(self, name)}")
        if self.hue > 0.5:
            raise ValueError(f"hue strength is at most 0.5 (turns), not {self.hue}")
        for name in ("crop_scale", "crop_ratio", "blur_sigmas"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be a range 0 < min <= max, not {getattr(self, name)}")
        if self.crop_padding is not None and self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, not {self.crop_padding}")

    @property
    def jitters(self) -> bool:
        """Whether colour jitter can change an image (a probability and a strength above 0)."""
        return self.jitter_prob > 0 and any((self.brightness, self.contrast, self.saturation, self.hue))

    @property
    def photometric(self) -> bool:
        """Whether the view has any colour augmentation (jitter, greyscale, blur, solarisation)."""
        return self.jitter_prob > 0 or self.grey_prob > 0 or self.blur_prob > 0 or self.solarize_prob > 0

    def cpu(self) -> "CPUView":
        """This view on the CPU (:class:`CPUView`), for DataLoader workers."""
        return CPUView(self)


class CPUView:
    """A :class:`ViewParams` as a CPU transform: RGB PIL image -> float32 ``[3, S, S]``.

    The pipeline: the crop (``RandomResizedCrop``, or ``Resize`` + ``CenterCrop`` + padded ``RandomCrop``),
    ``RandomHorizontalFlip``, then, when the view is :attr:`ViewParams.photometric`, lightly's colour
    stages in lightly's order (``RandomVerticalFlip`` and lightly's rotation at probability 0, kept only
    because lightly draws their random numbers, ``RandomApply(ColorJitter)``, ``RandomGrayscale``, lightly's
    ``GaussianBlur`` (PIL) and ``RandomSolarization``), then ``ToTensor`` and ``Normalize``. So a view with
    lightly's parameters is bit-identical to lightly's transform with them (BYOL, SimCLR, DINO, ...), and a
    view without colour stages to the plain torchvision pipeline (the supervised view).

    Draws from torch's CPU generator, NumPy's global generator (blur, solarisation, rotation) and nothing else.

    Attributes:
        params: the :class:`ViewParams`.
        transform: the torchvision ``Compose``.
    """

    def __init__(self, params: ViewParams) -> None:
        self.params = p = params
        size = p.input_size
        # lightly builds on torchvision's v2 transforms; the plain pipeline is torchvision's v1 (the supervised view):
        # the same random draws, but v1's ToTensor divides by 255 where v2's multiplies by 1/255 (1 ulp apart)
        tv = T2 if p.photometric else T
        if p.crop_padding is not None:
            stages = [tv.Resize(size), tv.CenterCrop(size), tv.RandomCrop(size, padding=p.crop_padding)]
        else:
            interpolation = T.InterpolationMode.BICUBIC if p.bicubic else T.InterpolationMode.BILINEAR
            stages = [tv.RandomResizedCrop(size, scale=p.crop_scale, ratio=p.crop_ratio, interpolation=interpolation)]
        stages.append(tv.RandomHorizontalFlip(p=p.flip_prob))
        if p.photometric:
            jitter = T2.ColorJitter(brightness=p.brightness, contrast=p.contrast, saturation=p.saturation, hue=p.hue)
            blur = GaussianBlur(sigmas=p.blur_sigmas, prob=p.blur_prob)
            solarize = RandomSolarization(prob=p.solarize_prob, threshold=p.solarize_threshold)
            stages += [
                T2.RandomVerticalFlip(p=0.0),
                random_rotation_transform(rr_prob=0.0, rr_degrees=None),
                T2.RandomApply([jitter], p=p.jitter_prob),
                T2.RandomGrayscale(p=p.grey_prob),
                *((solarize, blur) if p.solarize_first else (blur, solarize)),
            ]
        stages += [tv.ToTensor(), tv.Normalize(mean=list(p.mean), std=list(p.std))]
        self.transform = tv.Compose(stages)

    def __call__(self, image: Image.Image) -> Tensor:
        return self.transform(image)

    def __repr__(self) -> str:
        return f"CPUView({self.params})"


def rela_params(input_size: int) -> ViewParams:
    """One ReLA view (method.md, stage 2; Sun, Jiang, Lin, NeurIPS 2024, reference code):
    RandomResizedCrop scale (0.5, 1.0), horizontal flip, colour jitter (0.8, 0.8, 0.8, 0.2)
    with p = 0.8, greyscale with p = 0.2, no blur, no solarisation, ImageNet normalisation."""
    return ViewParams(
        input_size,
        crop_scale=(0.5, 1.0),
        jitter_prob=0.8,
        brightness=0.8,
        contrast=0.8,
        saturation=0.8,
        hue=0.2,
        grey_prob=0.2,
    )


def mocov2_params(input_size: int) -> ViewParams:
    """The MoCo v2 augmentation (Chen, Fan, Girshick, He 2020), which SimSiam also uses (Chen, He, CVPR 2021):
    random resized crop scale (0.2, 1), flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, greyscale
    p = 0.2, blur p = 0.5 (off at 64 px or less, :func:`blur_probability`), ImageNet normalisation."""
    return ViewParams(
        input_size,
        crop_scale=(0.2, 1.0),
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.1,
        grey_prob=0.2,
        blur_prob=blur_probability(input_size, 0.5),
    )


def rela_view(input_size: int) -> View:
    """:func:`rela_params` on the CPU (bit-identical to lightly's ``BYOLView1Transform`` with those parameters).

    Returns:
        A callable mapping an RGB PIL image to float32 ``[3, input_size, input_size]``.
    """
    return rela_params(input_size).cpu()


def blur_probability(input_size: int, probability: float) -> float:
    """A method's Gaussian-blur probability at ``input_size``: 0 at or below :data:`BLUR_MIN_SIZE` px
    (the usual CIFAR / Tiny-ImageNet practice: blurring a 32 px image erases it), else ``probability``."""
    return 0.0 if input_size < BLUR_MIN_SIZE else probability


def eval_view(input_size: int) -> View:
    """Evaluation view: resize the shorter side to ``input_size``, centre crop, ImageNet normalisation.

    Returns:
        A callable mapping an RGB PIL image to float32 ``[3, input_size, input_size]``.
    """
    return T.Compose(
        [
            T.Resize(input_size),
            T.CenterCrop(input_size),
            T.ToTensor(),
            T.Normalize(IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"]),
        ]
    )
