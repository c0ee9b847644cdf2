"""Target networks: torchvision ResNets without their classifier."""

from __future__ import annotations

import torchvision
from torch import nn

#: Inputs at most this many pixels wide use the CIFAR stem (method.md, stage 2).
CIFAR_STEM_MAX_SIZE = 64


def build_backbone(arch: str, input_size: int) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet whose ``forward`` returns the pooled feature.

    For inputs of 64 px or less the stem becomes a 3x3 stride-1 convolution with
    no max-pool, as in the ReLA reference code for CIFAR / Tiny-ImageNet.

    Args:
        arch: a torchvision ResNet name (``resnet18``, ``resnet50``, ...).
        input_size: training input size, pixels.

    Returns:
        ``(backbone, feature_dim)``: ``backbone`` maps float ``[B, 3, H, W]`` to
        float ``[B, feature_dim]`` (512 for ResNet-18/34, 2048 for ResNet-50+).

    Raises:
        ValueError: ``arch`` is not a torchvision ResNet.
    """
    names = [name for name in torchvision.models.list_models(module=torchvision.models) if "resnet" in name]
    if arch not in names:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(sorted(names))}")
    model = torchvision.models.get_model(arch, weights=None)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if input_size <= CIFAR_STEM_MAX_SIZE:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model, feature_dim
