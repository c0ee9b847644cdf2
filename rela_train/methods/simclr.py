"""SimCLR (Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020), built from lightly's head, loss and views."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from rela_train.methods.base import Method, MethodSettings, register_method
from rela_train.views import ViewParams, blur_probability

#: NT-Xent temperature: 0.5, SimCLR's CIFAR-10 setting (Chen et al. 2020, appendix B.9) and
#: lightly's default and CIFAR-10 benchmark value.
TEMPERATURE = 0.5


@register_method("simclr")
class SimCLR(Method):
    """SimCLR: contrast the two views of each image against the other images of the batch.

    Chen, Kornblith, Norouzi, Hinton, ICML 2020. Projection MLP ``D -> D -> 128`` (batch norm,
    ReLU; lightly's ``SimCLRProjectionHead``, hidden width D as in the paper). Loss: NT-Xent
    (lightly's ``NTXentLoss``, temperature :data:`TEMPERATURE`) over the ``2B`` projections, the
    other ``2B - 2`` views of the batch as negatives (of the global batch under data parallelism).
    Views: lightly's SimCLR view twice (random resized crop scale (0.08, 1), flip, colour jitter
    (0.8, 0.8, 0.8, 0.2) with p = 0.8, greyscale p = 0.2, blur p = 0.5), blur off at 64 px or
    less (:func:`rela_train.views.blur_probability`). Bookkeeping: none (no momentum network).
    Defaults: the shared ones (the paper's LARS / SGD settings have no AdamW counterpart).
    """

    def __init__(self, backbone: nn.Module, settings: MethodSettings) -> None:
        super().__init__(backbone, settings)
        dim = settings.feature_dim
        self.projection_head = SimCLRProjectionHead(dim, dim, 128)
        self.criterion = NTXentLoss(temperature=TEMPERATURE, gather_distributed=True)

    @staticmethod
    def view_params(input_size: int) -> tuple[ViewParams, ViewParams]:
        view = ViewParams(
            input_size,
            crop_scale=(0.08, 1.0),
            brightness=0.8,
            contrast=0.8,
            saturation=0.8,
            hue=0.2,
            grey_prob=0.2,
            blur_prob=blur_probability(input_size, 0.5),
        )
        return view, view

    def head_loss(
        self, feature_1: torch.Tensor, feature_2: torch.Tensor, labels: torch.Tensor, momentum: tuple | None = None
    ) -> torch.Tensor:
        """NT-Xent of the two views' projections ``[B, 128]``; scalar >= 0 (about ``ln(2B - 1)`` at random)."""
        return self.criterion(self.projection_head(feature_1), self.projection_head(feature_2))
