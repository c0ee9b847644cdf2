"""DINO (Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin, "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021), as the ReLA reference code runs it, built from
lightly's head, loss and views."""

from __future__ import annotations

import copy
import warnings

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.modules.heads import ProjectionHead
from lightly.models.utils import deactivate_requires_grad
from torch import nn

from rela_train.methods.base import Method, MethodSettings, momentum_or_detached, register_method
from rela_train.views import ViewParams, blur_probability

#: DINO head sizes of the ReLA reference: hidden 2048, bottleneck 256, output (prototypes) 2048.
HIDDEN_DIM, BOTTLENECK_DIM, OUTPUT_DIM = 2048, 256, 2048


def dino_head(feature_dim: int) -> DINOProjectionHead:
    """The reference's 2-layer DINO head: lightly's ``DINOProjectionHead`` (3 layers, no option
    for fewer in lightly 1.6) with its MLP replaced, as the reference does, by lightly's
    ``ProjectionHead`` ``D -> 2048 (batch norm, GELU) -> 256``; then L2 normalisation and the
    weight-normalised ``256 -> 2048`` last layer. Float ``[B, D]`` -> ``[B, 2048]``."""
    with warnings.catch_warnings():  # lightly 1.6's last layer uses torch.nn.utils.weight_norm, deprecated in torch
        warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated", category=FutureWarning)
        head = DINOProjectionHead(feature_dim, HIDDEN_DIM, BOTTLENECK_DIM, OUTPUT_DIM, batch_norm=True)
    head.layers = ProjectionHead(
        [(feature_dim, HIDDEN_DIM, nn.BatchNorm1d(HIDDEN_DIM), nn.GELU()), (HIDDEN_DIM, BOTTLENECK_DIM, None, None)]
    ).layers
    return head


@register_method("dino")
class DINO(Method):
    """DINO: the student matches the centred, sharpened output of its momentum teacher on the other view.

    Caron et al., ICCV 2021, as in the ReLA reference code (method.md, stage 2: 2-layer DINO head,
    2048-d output, no local crops, momentum 0.99). Student head ``D -> 2048 -> 256 -> 2048``
    (:func:`dino_head`); teacher: a momentum copy of backbone and head, initialised from the
    student (the reference builds the teacher head afresh instead; DINO copies the student).
    Loss: lightly's ``DINOLoss`` (output 2048, student temperature 0.1, teacher temperature
    0.04 with lightly's 30-epoch warm-up from 0.04, i.e. constant, as the reference; centre
    momentum 0.9), cross-view terms only, the epoch taken from the optimiser steps done
    (``settings.steps_per_epoch``). Each call updates the loss's centre (a buffer of
    ``criterion``, saved and restored with the model). Views: DINO's two global crops through
    lightly's DINO view (random resized crop scale (0.4, 1), flip, colour jitter
    (0.4, 0.4, 0.2, 0.1) with p = 0.8, greyscale p = 0.2; blur p = 1.0 / 0.1, solarisation
    p = 0 / 0.2), blur off at 64 px or less (:func:`rela_train.views.blur_probability`, as the
    reference turns it off on CIFAR). Bookkeeping: EMA of teacher backbone and head after every
    step with constant momentum ``settings.momentum`` (0.99); a step counter buffer. Defaults:
    the shared ones (the reference trains DINO with AdamW lr 1e-3, weight decay 0.01).
    """

    def __init__(self, backbone: nn.Module, settings: MethodSettings) -> None:
        super().__init__(backbone, settings)
        self.projection_head = dino_head(settings.feature_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        # the weight-normalised last layer cannot be deep-copied: build the teacher head and load the student's weights
        self.projection_head_momentum = dino_head(settings.feature_dim)
        self.projection_head_momentum.load_state_dict(self.projection_head.state_dict())
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = DINOLoss(output_dim=OUTPUT_DIM)
        self.steps_done: torch.Tensor
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))

    @staticmethod
    def view_params(input_size: int) -> tuple[ViewParams, ViewParams]:
        """lightly's ``DINOViewTransform`` defaults (jitter strength 0.5 x (0.8, 0.8, 0.4, 0.2), bicubic crops)."""
        common = dict(
            crop_scale=(0.4, 1.0), bicubic=True, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grey_prob=0.2
        )
        return (
            ViewParams(input_size, **common, blur_prob=blur_probability(input_size, 1.0), solarize_prob=0.0),
            ViewParams(input_size, **common, blur_prob=blur_probability(input_size, 0.1), solarize_prob=0.2),
        )

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_momentum), (self.projection_head, self.projection_head_momentum)]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The EMA update of the teacher, then count the step (for the loss's epoch)."""
        super().after_step(step)
        self.steps_done.fill_(step + 1)

    def head_loss(
        self, feature_1: torch.Tensor, feature_2: torch.Tensor, labels: torch.Tensor, momentum: tuple | None = None
    ) -> torch.Tensor:
        """Cross-entropy of teacher and student distributions ``[B, 2048]`` across the views; scalar >= 0
        (at most about ``ln 2048`` at random). Updates the centre."""
        student = [self.projection_head(feature) for feature in (feature_1, feature_2)]
        with torch.no_grad():
            teacher = [
                self.projection_head_momentum(feature)
                for feature in momentum_or_detached(momentum, feature_1, feature_2)
            ]
        epoch = int(self.steps_done) // max(self.settings.steps_per_epoch, 1)
        return self.criterion(teacher, student, epoch=epoch)
