"""SimSiam (Chen, He, "Exploring Simple Siamese Representation Learning", CVPR 2021), built from
lightly's heads, loss and views."""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from torch import nn

from rela_train.methods.base import Method, MethodSettings, register_method
from rela_train.views import ViewParams, mocov2_params


@register_method("simsiam")
class SimSiam(Method):
    """SimSiam: predict the other view's projection, with a stop-gradient and no momentum network.

    Chen, He, CVPR 2021. Projection MLP ``D -> 2048 -> 2048 -> 2048`` (batch norm, ReLU; lightly's
    ``SimSiamProjectionHead``), prediction MLP ``2048 -> 512 -> 2048`` (lightly's
    ``SimSiamPredictionHead``; the paper's bottleneck). Loss: symmetric negative cosine similarity
    of each view's prediction and the other view's projection, the projection detached (the
    stop-gradient). Views: lightly's SimSiam view twice (random resized crop scale (0.2, 1), flip,
    colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8, greyscale p = 0.2, blur p = 0.5), blur off at
    64 px or less (:func:`rela_train.views.blur_probability`). Bookkeeping: none. Defaults: the
    shared ones (the paper's SGD settings have no AdamW counterpart).
    """

    def __init__(self, backbone: nn.Module, settings: MethodSettings) -> None:
        super().__init__(backbone, settings)
        self.projection_head = SimSiamProjectionHead(settings.feature_dim, 2048, 2048)
        self.prediction_head = SimSiamPredictionHead(2048, 512, 2048)
        self.criterion = NegativeCosineSimilarity()

    @staticmethod
    def view_params(input_size: int) -> tuple[ViewParams, ViewParams]:
        view = mocov2_params(input_size)
        return view, view

    def head_loss(
        self, feature_1: torch.Tensor, feature_2: torch.Tensor, labels: torch.Tensor, momentum: tuple | None = None
    ) -> torch.Tensor:
        """Symmetric negative cosine similarity of predictions ``[B, 2048]`` and detached projections;
        scalar in [-1, 1]."""
        projection_1 = self.projection_head(feature_1)
        projection_2 = self.projection_head(feature_2)
        prediction_1, prediction_2 = self.prediction_head(projection_1), self.prediction_head(projection_2)
        return 0.5 * (
            self.criterion(prediction_1, projection_2.detach()) + self.criterion(prediction_2, projection_1.detach())
        )
