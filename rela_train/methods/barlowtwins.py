"""Barlow Twins (Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via
Redundancy Reduction", ICML 2021), built from lightly's head, loss and views."""

from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import nn

from rela_train.methods.base import Method, MethodSettings, register_method
from rela_train.methods.byol import byol_view_params
from rela_train.views import ViewParams


@register_method("barlowtwins")
class BarlowTwins(Method):
    """Barlow Twins: drive the cross-correlation of the two views' projections to the identity.

    Zbontar, Jing, Misra, LeCun, Deny, ICML 2021. Projection MLP ``D -> 2048 -> 2048 -> 2048``
    (batch norm, ReLU; lightly's ``BarlowTwinsProjectionHead`` at lightly's ResNet-18 width, the
    paper's 8192 being for ResNet-50 on ImageNet). Loss: lightly's ``BarlowTwinsLoss``
    (lambda 0.005, the paper's), the correlation over the global batch under data parallelism.
    Views: the paper's BYOL augmentations, lightly's BYOL view 1 / view 2 (asymmetric blur 1.0 /
    0.1, solarisation on view 2), blur off at 64 px or less
    (:func:`rela_train.methods.byol.byol_view_params`). Bookkeeping: none (no momentum network).
    Defaults: the shared ones (the paper's LARS settings have no AdamW counterpart).
    """

    def __init__(self, backbone: nn.Module, settings: MethodSettings) -> None:
        super().__init__(backbone, settings)
        self.projection_head = BarlowTwinsProjectionHead(settings.feature_dim, 2048, 2048)
        self.criterion = BarlowTwinsLoss(gather_distributed=True)

    @staticmethod
    def view_params(input_size: int) -> tuple[ViewParams, ViewParams]:
        return byol_view_params(input_size)

    def head_loss(
        self, feature_1: torch.Tensor, feature_2: torch.Tensor, labels: torch.Tensor, momentum: tuple | None = None
    ) -> torch.Tensor:
        """Barlow Twins loss of the projections ``[B, 2048]``; scalar >= 0 (0 when the
        cross-correlation is the identity)."""
        return self.criterion(self.projection_head(feature_1), self.projection_head(feature_2))
