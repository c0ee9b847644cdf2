"""MoCo v2 (Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive Learning",
arXiv 2003.04297, 2020; MoCo: He, Fan, Wu, Xie, Girshick, CVPR 2020), built from lightly's head,
loss and views."""

from __future__ import annotations

import copy

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from rela_train.methods.base import Method, MethodSettings, momentum_or_detached, register_method
from rela_train.views import ViewParams, mocov2_params

#: Keys in the queue of negatives. MoCo uses 65,536 on ImageNet; 4,096 is lightly's CIFAR-10 choice
#: (about one epoch of a 10% CIFAR subset). The queue starts as random unit vectors, so a dataset
#: smaller than the queue only means some negatives stay random.
QUEUE_SIZE = 4096

#: Projection size (MoCo v2's 128-d output).
OUTPUT_DIM = 128

#: InfoNCE temperature: 0.2, MoCo v2's value (Chen et al. 2020).
TEMPERATURE = 0.2


@register_method("moco")
class MoCo(Method):
    """MoCo v2: contrast a query against its momentum-encoded key and a queue of past keys.

    Chen, Fan, Girshick, He, arXiv 2003.04297, 2020. Projection MLP ``D -> D -> 128`` (ReLU,
    no batch norm; lightly's ``MoCoProjectionHead``, hidden width D as MoCo v2's 2048 for a
    ResNet-50), and its momentum copy with the momentum backbone. Loss (as the paper, not
    symmetrised): InfoNCE (lightly's ``NTXentLoss``, temperature :data:`TEMPERATURE`) of the
    query of view 1 against the key of view 2 and the :data:`QUEUE_SIZE` keys of the queue; each
    call pushes the batch's keys (of all ranks under data parallelism) into the queue. The queue
    (``criterion.memory_bank.bank`` and its pointer, which lightly registers as non-persistent
    buffers) is made persistent here, so it is saved in checkpoints and restored on resume.
    Views: MoCo v2's augmentation through lightly's SimCLR view with MoCo v2's parameters (random
    resized crop scale (0.2, 1), flip, colour jitter (0.4, 0.4, 0.4, 0.1) with p = 0.8,
    greyscale p = 0.2, blur p = 0.5), blur off at 64 px or less
    (:func:`rela_train.views.blur_probability`). Bookkeeping: EMA of backbone and head after every
    step, momentum rising from ``settings.momentum`` (shared default 0.99) to 1 on a cosine
    schedule over ``settings.total_steps`` (lightly's MoCo example: ``cosine_schedule`` from
    0.996 to 1; MoCo v2 itself keeps 0.999). The queue only fills while the method's loss runs
    (after the ReLA switch). Defaults: the shared ones (the paper's SGD settings have no AdamW
    counterpart).
    """

    def __init__(self, backbone: nn.Module, settings: MethodSettings) -> None:
        super().__init__(backbone, settings)
        dim = settings.feature_dim
        self.projection_head = MoCoProjectionHead(dim, dim, OUTPUT_DIM)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(
            temperature=TEMPERATURE, memory_bank_size=(QUEUE_SIZE, OUTPUT_DIM), gather_distributed=True
        )
        queue = self.criterion.memory_bank  # lightly registers the queue non-persistent: keep it in state_dict
        queue.register_buffer("bank", queue.bank, persistent=True)
        queue.register_buffer("bank_ptr", queue.bank_ptr, persistent=True)

    @staticmethod
    def view_params(input_size: int) -> tuple[ViewParams, ViewParams]:
        view = mocov2_params(input_size)
        return view, view

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.backbone, self.backbone_momentum), (self.projection_head, self.projection_head_momentum)]

    def momentum_at(self, step: int) -> float:
        """Cosine schedule from ``settings.momentum`` at step 0 to 1 at the last step."""
        return cosine_schedule(step, self.settings.total_steps, self.settings.momentum, 1.0)

    @torch.no_grad()
    def momentum_features(self, view_1: torch.Tensor, view_2: torch.Tensor) -> tuple:
        """Only view 2's (the keys'): view 1 is the query's."""
        return None, self.backbone_momentum(view_2)

    def head_loss(
        self, feature_1: torch.Tensor, feature_2: torch.Tensor, labels: torch.Tensor, momentum: tuple | None = None
    ) -> torch.Tensor:
        """InfoNCE of queries ``[B, 128]`` (view 1) against keys (view 2) and the queue; scalar >= 0
        (about ``ln(QUEUE_SIZE + 1)`` at random). Enqueues the keys."""
        query = self.projection_head(feature_1)
        with torch.no_grad():
            key = self.projection_head_momentum(momentum_or_detached(momentum, feature_1, feature_2)[1])
        return self.criterion(query, key)
