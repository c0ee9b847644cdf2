"""Augmented views, from lightly's BYOL view transforms (PIL image in, float tensor out)."""

from __future__ import annotations

from typing import Callable

import torchvision.transforms as T
from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch import Tensor

#: Gaussian blur is left out at or below this input size (the usual CIFAR / Tiny-ImageNet practice).
BLUR_MIN_SIZE = 65

View = Callable[[Image.Image], Tensor]


def rela_view(input_size: int) -> View:
    """One ReLA view (method.md, stage 2; Sun, Jiang, Lin, NeurIPS 2024, reference code):
    RandomResizedCrop scale (0.5, 1.0), horizontal flip, colour jitter (0.8, 0.8, 0.8, 0.2)
    with p = 0.8, greyscale with p = 0.2, ImageNet normalisation.

    Returns:
        A callable mapping an RGB PIL image to float32 ``[3, input_size, input_size]``.
    """
    return BYOLView1Transform(
        input_size=input_size,
        min_scale=0.5,
        cj_prob=0.8,
        cj_bright=0.8,
        cj_contrast=0.8,
        cj_sat=0.8,
        cj_hue=0.2,
        random_gray_scale=0.2,
        gaussian_blur=0.0,
        solarization_prob=0.0,
    )


def method_views(method: str, input_size: int) -> tuple[View, View]:
    """The self-supervised method's own two views (BYOL: Grill et al. 2020, asymmetric
    blur / solarisation; blur off for inputs of 64 px or less).

    Raises:
        ValueError: unknown method.
    """
    if method != "byol":
        raise ValueError(f"unknown method {method!r}")
    small = input_size < BLUR_MIN_SIZE
    return (
        BYOLView1Transform(input_size=input_size, gaussian_blur=0.0 if small else 1.0),
        BYOLView2Transform(input_size=input_size, gaussian_blur=0.0 if small else 0.1),
    )


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
