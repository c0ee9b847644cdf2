"""VICReg (Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
Self-Supervised Learning", ICLR 2022), built from lightly's head, loss and views."""

from __future__ import annotations

import torch
from lightly.loss import VICRegLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import nn

from rela_train.methods.base import Method, MethodSettings, register_method
from rela_train.views import ViewParams, blur_probability


@register_method("vicreg")
class VICReg(Method):
    """VICReg: invariance between the views, variance kept up and covariance pushed down per view.

    Bardes, Ponce, LeCun, ICLR 2022. Projection MLP ``D -> 2048 -> 2048 -> 2048`` (batch norm,
    ReLU; lightly's VICReg example uses ``BarlowTwinsProjectionHead``, the paper's 8192 being for
    ResNet-50 on ImageNet). Loss: lightly's ``VICRegLoss`` (invariance 25, variance 25,
    covariance 1, the paper's), variance and covariance over the global batch under data
    parallelism. Views: lightly's VICReg view twice (random resized crop scale (0.08, 1), flip,
    colour jitter (0.4, 0.4, 0.2, 0.1) with p = 0.8, greyscale p = 0.2, solarisation p = 0.1,
    blur p = 0.5), blur off at 64 px or less (:func:`rela_train.views.blur_probability`).
    Bookkeeping: none (no momentum network). Defaults: the shared ones (the paper's LARS settings
    have no AdamW counterpart).
    """

    def __init__(self, backbone: nn.Module, settings: MethodSettings) -> None:
        super().__init__(backbone, settings)
        self.projection_head = BarlowTwinsProjectionHead(settings.feature_dim, 2048, 2048)
        self.criterion = VICRegLoss(gather_distributed=True)

    @staticmethod
    def view_params(input_size: int) -> tuple[ViewParams, ViewParams]:
        """lightly's ``VICRegViewTransform`` defaults (jitter strength 0.5 x (0.8, 0.8, 0.4, 0.2), blur sigma
        0.2-2, solarisation before the blur)."""
        view = ViewParams(
            input_size,
            crop_scale=(0.08, 1.0),
            brightness=0.4,
            contrast=0.4,
            saturation=0.2,
            hue=0.1,
            grey_prob=0.2,
            blur_prob=blur_probability(input_size, 0.5),
            blur_sigmas=(0.2, 2.0),
            solarize_prob=0.1,
            solarize_first=True,
        )
        return view, view

    def head_loss(
        self, feature_1: torch.Tensor, feature_2: torch.Tensor, labels: torch.Tensor, momentum: tuple | None = None
    ) -> torch.Tensor:
        """VICReg loss of the projections ``[B, 2048]``; scalar >= 0."""
        return self.criterion(self.projection_head(feature_1), self.projection_head(feature_2))
