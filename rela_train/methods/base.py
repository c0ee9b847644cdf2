"""What every training method declares, and the registry that finds methods by name.

A method (solo-learn's method/config split, lightly's heads and losses) is one file in this
package, a subclass of :class:`Method` decorated with ``@register_method("<name>")``. It declares:

- its networks and heads (built in ``__init__`` around the given backbone),
- its two views' parameters (:meth:`Method.view_params`, its paper's augmentations), from which
  both the CPU views (:meth:`Method.views`) and the device views (:mod:`rela_train.device_views`) are built,
- its loss on the backbone's features (:meth:`Method.head_loss`; :meth:`Method.loss` runs the backbone
  first, and :meth:`Method.momentum_features` the momentum backbone of the methods that have one),
- its per-step bookkeeping (:meth:`Method.momentum_pairs` and :meth:`Method.momentum_at`:
  the momentum (EMA) networks and their schedule; none by default),
- the training options it changes from the shared defaults (:attr:`Method.defaults`) and
  whether it needs the labels the conversion stored (:attr:`Method.needs_labels`).

While ReLA is active the trainer optimises the ReLA loss on ``method.backbone`` and still calls
:meth:`Method.after_step` every step (method.md, stage 2: the method's bookkeeping runs in both
phases); with ``--handover warm`` it also fits the heads through :meth:`Method.head_loss` on the
backbone's detached features of the ReLA views (:mod:`rela_train.handover`). After the switch it
optimises :meth:`Method.loss` on the method's own views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from lightly.models.utils import update_momentum
from torch import nn

from rela_convert.registry import Registry
from rela_train.views import View, ViewParams

#: Training options shared by every method unless its :attr:`Method.defaults` says otherwise:
#: AdamW, lr 1e-3, weight decay 0.01, momentum 0.99 (the reference's BYOL and DINO, method.md stage 2).
SHARED_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.01, "momentum": 0.99}

METHODS: Registry[type["Method"]] = Registry("method", "rela_train.methods")
register_method = METHODS.register


@dataclass(frozen=True)
class MethodSettings:
    """What a method is built from besides its backbone.

    Attributes:
        feature_dim: D, the backbone's pooled feature length.
        input_size: training input size, pixels (views are made at this size).
        num_classes: classes of the converted dataset (``len(index.classes)``; 0 without class folders).
        momentum: base momentum of the EMA networks (``--momentum``, resolved).
        total_steps: optimiser steps of the whole run (for momentum / temperature schedules).
        steps_per_epoch: optimiser steps per epoch.
    """

    feature_dim: int
    input_size: int
    num_classes: int = 0
    momentum: float = SHARED_DEFAULTS["momentum"]
    total_steps: int = 1
    steps_per_epoch: int = 1


class Method(nn.Module):
    """Base class of the training methods.

    Args:
        backbone: maps float ``[B, 3, S, S]`` to float ``[B, D]`` (``settings.feature_dim``).
        settings: :class:`MethodSettings`.

    Attributes:
        backbone: the network being trained (what ReLA's loss and evaluation use).
        registered_name: the name the method is registered under (set by the decorator).
        defaults: training options that differ from :data:`SHARED_DEFAULTS` (``lr``, ``weight_decay``, ``momentum``).
        needs_labels: whether :meth:`loss` uses the labels (datasets without class folders are refused).
    """

    registered_name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    needs_labels: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module, settings: MethodSettings) -> None:
        super().__init__()
        self.backbone = backbone
        self.settings = settings

    @staticmethod
    def view_params(input_size: int) -> tuple[ViewParams, ViewParams]:
        """The parameters of the method's two views at ``input_size`` px (:class:`rela_train.views.ViewParams`)."""
        raise NotImplementedError

    @classmethod
    def views(cls, input_size: int) -> tuple[View, View]:
        """The method's two views on the CPU (:meth:`view_params` through :meth:`ViewParams.cpu`): callables from
        an RGB PIL image to float32 ``[3, S, S]``."""
        first, second = cls.view_params(input_size)
        view = first.cpu()
        return view, (view if second == first else second.cpu())

    def loss(self, view_1: torch.Tensor, view_2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The method's loss on two augmented batches float ``[B, 3, S, S]`` of the same images;
        ``labels`` int64 ``[B]`` (-1 where the dataset has none). Returns a scalar tensor:
        :meth:`head_loss` of the backbone's features and the momentum backbone's (:meth:`momentum_features`)."""
        momentum = self.momentum_features(view_1, view_2)
        return self.head_loss(self.backbone(view_1), self.backbone(view_2), labels, momentum)

    @torch.no_grad()
    def momentum_features(self, view_1: torch.Tensor, view_2: torch.Tensor) -> tuple | None:
        """The momentum backbone's (``backbone_momentum``) features of the two views, float ``[B, D]`` each (a
        method may leave out one it does not use: None), computed without gradients; None for methods without a
        momentum backbone."""
        momentum = getattr(self, "backbone_momentum", None)
        return None if momentum is None else (momentum(view_1), momentum(view_2))

    def head_loss(
        self, feature_1: torch.Tensor, feature_2: torch.Tensor, labels: torch.Tensor, momentum: tuple | None = None
    ) -> torch.Tensor:
        """The method's loss from the backbone's features float ``[B, D]`` of the two views: its heads and criterion.

        ``momentum``: the momentum backbone's features (:meth:`momentum_features`); None stands in the two
        features themselves, detached (the warm hand-over's heads, fitted on the online backbone's detached
        features while ReLA trains it: no extra backbone pass, :mod:`rela_train.handover`). Scalar tensor."""
        raise NotImplementedError

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, momentum copy)`` module pairs updated by EMA after every step; none by default."""
        return []

    def momentum_at(self, step: int) -> float:
        """Momentum used after optimiser step ``step`` (0-based); constant ``settings.momentum`` by default."""
        return self.settings.momentum

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The method's per-step bookkeeping, run after every optimiser step in both phases:
        the EMA update of every :meth:`momentum_pairs` pair with :meth:`momentum_at`."""
        pairs = self.momentum_pairs()
        if pairs:
            momentum = self.momentum_at(step)
            for online, target in pairs:
                update_momentum(online, target, m=momentum)


def momentum_or_detached(
    momentum: tuple | None, feature_1: torch.Tensor, feature_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``momentum`` (the momentum backbone's two features), or the two online features detached when it is None
    (see :meth:`Method.head_loss`)."""
    return momentum if momentum is not None else (feature_1.detach(), feature_2.detach())


def resolved_option(method: type[Method], name: str, value: Any) -> Any:
    """``value`` when given, else the method's default for option ``name``, else the shared default."""
    if value is not None:
        return value
    return method.defaults.get(name, SHARED_DEFAULTS[name])
