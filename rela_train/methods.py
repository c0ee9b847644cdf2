"""Self-supervised methods, built from lightly's heads and losses (solo-learn style:
a method holds its networks and its loss; the trainer holds the loop)."""

from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn


class BYOL(nn.Module):
    """BYOL (Grill et al., NeurIPS 2020) as in the ReLA reference code (method.md, stage 2):
    projection MLP ``D -> 2D -> 256``, prediction MLP ``256 -> 2D -> 256`` (batch
    norm, ReLU), symmetric negative cosine loss, momentum target network.

    Args:
        backbone: maps images ``[B, 3, H, W]`` to features ``[B, feature_dim]``.
        feature_dim: D.
        momentum: target network momentum (0.99).
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, momentum: float = 0.99) -> None:
        super().__init__()
        self.momentum = momentum
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(feature_dim, 2 * feature_dim, 256)
        self.prediction_head = BYOLPredictionHead(256, 2 * feature_dim, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def update_momentum(self) -> None:
        """One exponential-moving-average step of the target network (every optimiser step,
        in both phases: the method's bookkeeping runs while ReLA is active, method.md)."""
        update_momentum(self.backbone, self.backbone_momentum, m=self.momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=self.momentum)

    def loss(self, view_1: torch.Tensor, view_2: torch.Tensor) -> torch.Tensor:
        """Symmetric BYOL loss of two augmented batches float ``[B, 3, H, W]``; scalar in [-1, 1]."""
        online_1 = self.prediction_head(self.projection_head(self.backbone(view_1)))
        online_2 = self.prediction_head(self.projection_head(self.backbone(view_2)))
        with torch.no_grad():
            target_1 = self.projection_head_momentum(self.backbone_momentum(view_1))
            target_2 = self.projection_head_momentum(self.backbone_momentum(view_2))
        return 0.5 * (self.criterion(online_1, target_2) + self.criterion(online_2, target_1))


METHODS = {"byol": BYOL}
