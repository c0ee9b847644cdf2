"""The views every method shares: ReLA's training view and the evaluation view (PIL image in, float tensor out).

Each method declares its own two views in its file (:mod:`rela_train.methods`).
"""

from __future__ import annotations

from typing import Callable

import torchvision.transforms as T
from lightly.transforms.byol_transform import BYOLView1Transform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from PIL import Image
from torch import Tensor

#: Gaussian blur is left out at or below this input size (the usual CIFAR / Tiny-ImageNet practice).
BLUR_MIN_SIZE = 65

#: A view: an RGB PIL image -> float32 ``[3, S, S]``.
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
