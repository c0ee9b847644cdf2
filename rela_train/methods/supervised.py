"""Supervised training with the stored class labels: the cross-entropy baseline (the CIFAR
recipe of He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rela_train.methods.base import Method, MethodSettings, register_method
from rela_train.views import BLUR_MIN_SIZE, View, ViewParams


def supervised_view_params(input_size: int) -> ViewParams:
    """The usual supervised augmentation: at or below 64 px (CIFAR, Tiny-ImageNet) a random
    ``S x S`` crop of the image padded by ``S // 8`` px (4 px at 32, He et al. 2016) and a
    horizontal flip, after resizing the shorter side to S and centre-cropping (a no-op on images
    already ``S x S``); above 64 px a random resized crop (scale (0.08, 1)) and a flip. No colour
    augmentation. Then ImageNet normalisation."""
    padding = input_size // 8 if input_size < BLUR_MIN_SIZE else None
    return ViewParams(input_size, crop_scale=(0.08, 1.0), crop_padding=padding, jitter_prob=0.0, grey_prob=0.0)


def supervised_view(input_size: int) -> View:
    """:func:`supervised_view_params` on the CPU: RGB PIL image -> float32 ``[3, S, S]``."""
    return supervised_view_params(input_size).cpu()


@register_method("supervised")
class Supervised(Method):
    """Supervised: a linear classifier on the backbone's feature, trained with the stored labels.

    Cross-entropy baseline (He, Zhang, Ren, Sun, CVPR 2016 augmentation). Head: linear
    ``D -> num_classes`` (``settings.num_classes``, the converted dataset's class folders).
    Loss: mean cross-entropy of both views against the labels. Views: :func:`supervised_view`
    twice. Bookkeeping: none. Defaults: the shared ones. Needs labels: datasets converted without
    class folders are refused (:attr:`needs_labels`).

    Raises:
        ValueError: ``settings.num_classes`` is below 2 (no class labels to train on).
    """

    needs_labels = True

    def __init__(self, backbone: nn.Module, settings: MethodSettings) -> None:
        super().__init__(backbone, settings)
        if settings.num_classes < 2:
            raise ValueError(
                f"supervised training needs at least 2 classes, got {settings.num_classes}: "
                "convert a tree with class folders"
            )
        self.classifier = nn.Linear(settings.feature_dim, settings.num_classes)

    @staticmethod
    def view_params(input_size: int) -> tuple[ViewParams, ViewParams]:
        view = supervised_view_params(input_size)
        return view, view

    def head_loss(
        self, feature_1: torch.Tensor, feature_2: torch.Tensor, labels: torch.Tensor, momentum: tuple | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy of both views' logits ``[B, num_classes]`` against ``labels`` (int64 ``[B]``,
        all in ``[0, num_classes)``); scalar >= 0 (about ``ln num_classes`` at random)."""
        return 0.5 * (
            F.cross_entropy(self.classifier(feature_1), labels) + F.cross_entropy(self.classifier(feature_2), labels)
        )
