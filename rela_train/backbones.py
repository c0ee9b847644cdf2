"""Target networks: torchvision ResNets without their classifier, with a stem chosen for the input size."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

#: Inputs at most this many pixels wide use the CIFAR stem under ``--stem auto`` (method.md, stage 2).
CIFAR_STEM_MAX_SIZE = 64
#: ``auto``: CIFAR stem up to :data:`CIFAR_STEM_MAX_SIZE` px, else ImageNet stem. ``cifar``: 3x3 stride-1
#: convolution, no max-pool (the ReLA reference for 32 and 64 px). ``cifar-pool``: the same convolution followed
#: by torchvision's 3x3 stride-2 max-pool (feature maps half as wide: about 4x cheaper than ``cifar``).
#: ``imagenet``: torchvision's 7x7 stride-2 convolution and max-pool (feature maps a quarter as wide as
#: ``cifar``'s: about 16x cheaper at 32 px).
STEMS = ("auto", "cifar", "cifar-pool", "imagenet")


def resnet_names() -> list[str]:
    """The torchvision ResNet (and wide / ResNeXt) names ``--arch`` accepts, sorted."""
    return sorted(name for name in torchvision.models.list_models(module=torchvision.models) if "resn" in name)


def resolve_stem(stem: str, input_size: int) -> str:
    """``auto`` -> ``cifar`` for inputs of at most 64 px, else ``imagenet``; other names unchanged.

    Raises:
        ValueError: ``stem`` is not one of :data:`STEMS`.
    """
    if stem not in STEMS:
        raise ValueError(f"unknown --stem {stem!r}; choose one of {', '.join(STEMS)}")
    if stem == "auto":
        return "cifar" if input_size <= CIFAR_STEM_MAX_SIZE else "imagenet"
    return stem


def build_backbone(arch: str, input_size: int, stem: str = "auto") -> tuple[nn.Module, int]:
    """A randomly initialised torchvision ResNet whose ``forward`` returns the pooled feature.

    With the ``cifar`` stem the first convolution is 3x3 stride 1 with no max-pool, as in the
    ReLA reference code for CIFAR / Tiny-ImageNet (method.md, stage 2); see :data:`STEMS` for
    the cheaper ones.

    Args:
        arch: a torchvision ResNet name (``resnet18``, ``resnet50``, ...).
        input_size: training input size, pixels.
        stem: one of :data:`STEMS`.

    Returns:
        ``(backbone, feature_dim)``: ``backbone`` maps float ``[B, 3, H, W]`` to
        float ``[B, feature_dim]`` (512 for ResNet-18/34, 2048 for ResNet-50+).

    Raises:
        ValueError: ``arch`` is not a torchvision ResNet, or an unknown stem.
    """
    names = resnet_names()
    if arch not in names:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(names)}")
    stem = resolve_stem(stem, input_size)
    model = torchvision.models.get_model(arch, weights=None)
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if stem in ("cifar", "cifar-pool"):
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    if stem == "cifar":
        model.maxpool = nn.Identity()
    return model, feature_dim


def initial_backbone(arch: str, input_size: int, stem: str, seed: int) -> tuple[nn.Module, int]:
    """The backbone exactly as ``rela train --seed seed`` initialises it (the first draw after
    ``torch.manual_seed(seed)``), without touching the global random state.

    This is the reference's "Rand." prior (a copy of the target network's own random
    initialisation, method.md stage 2) and the ``untrained`` row of ``rela study``.

    Returns:
        ``(backbone in eval mode, feature_dim)``, as :func:`build_backbone`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, feature_dim = build_backbone(arch, input_size, stem)
    return backbone.eval(), feature_dim
