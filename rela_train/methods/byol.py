"""BYOL (Grill et al., "Bootstrap your own latent", NeurIPS 2020), as the ReLA reference code runs it."""

from __future__ import annotations

import copy

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad
from torch import nn

from rela_train.methods.base import Method, MethodSettings, momentum_or_detached, register_method
from rela_train.views import ViewParams, blur_probability


def byol_view_params(input_size: int) -> tuple[ViewParams, ViewParams]:
    """BYOL's two views (Grill et al. 2020, table 6; lightly's ``BYOLView1Transform`` / ``BYOLView2Transform``
    defaults): random resized crop scale (0.08, 1), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8,
    greyscale p = 0.2, blur (sigma 0.1-2) p = 1.0 / 0.1 (none at 64 px or less,
    :func:`rela_train.views.blur_probability`), solarisation p = 0 / 0.2, ImageNet normalisation."""
    common = dict(crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grey_prob=0.2)
    return (
        ViewParams(input_size, **common, blur_prob=blur_probability(input_size, 1.0), solarize_prob=0.0),
        ViewParams(input_size, **common, blur_prob=blur_probability(input_size, 0.1), solarize_prob=0.2),
    )


@register_method("byol")
class BYOL(Method):
    """BYOL: predict a momentum network's projection of the other view (the reference's method).

    As in the ReLA reference code (method.md, stage 2): projection MLP ``D -> 2D -> 256``,
    prediction MLP ``256 -> 2D -> 256`` (batch norm, ReLU), symmetric negative cosine loss,
    momentum network updated every step with constant momentum (0.99). Views: lightly's
    BYOL view 1 / view 2 (asymmetric blur 1.0 / 0.1, solarisation on view 2), blur off at
    64 px or less (:func:`rela_train.views.blur_probability`).
    """

    def __init__(self, backbone: nn.Module, settings: MethodSettings) -> None:
        super().__init__(backbone, settings)
        dim = settings.feature_dim
        self.projection_head = BYOLProjectionHead(dim, 2 * dim, 256)
        self.prediction_head = BYOLPredictionHead(256, 2 * dim, 256)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    @staticmethod
    def view_params(input_size: int) -> tuple[ViewParams, ViewParams]:
        return byol_view_params(input_size)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_momentum), (self.projection_head, self.projection_head_momentum)]

    def head_loss(
        self, feature_1: torch.Tensor, feature_2: torch.Tensor, labels: torch.Tensor, momentum: tuple | None = None
    ) -> torch.Tensor:
        """Symmetric negative cosine similarity of online predictions and momentum projections; scalar in [-1, 1]."""
        online_1 = self.prediction_head(self.projection_head(feature_1))
        online_2 = self.prediction_head(self.projection_head(feature_2))
        momentum_1, momentum_2 = momentum_or_detached(momentum, feature_1, feature_2)
        with torch.no_grad():
            target_1 = self.projection_head_momentum(momentum_1)
            target_2 = self.projection_head_momentum(momentum_2)
        return 0.5 * (self.criterion(online_1, target_2) + self.criterion(online_2, target_1))
