"""The ReLA loss and when to stop using it (method.md, stage 2).

Sun, Jiang, Lin, "Efficiency for Free: Ideal Data Are Transportable
Representations", NeurIPS 2024, Sec. 4.2 (ReLA-F) and the authors' reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: ``fixed``: ``W`` keeps its random initialisation (the reference: it is not among the optimiser's
#: parameters, so the backbone alone must fit the targets through a fixed random map); ``trained``:
#: ``W`` is optimised with the backbone (AdamW, with weight decay), this project's earlier default.
TRANSFER_HEADS = ("fixed", "trained")


class TransferHead(nn.Linear):
    """The linear "transfer" head ``W: D_target -> d`` (with bias, PyTorch's default
    initialisation) that maps the backbone's pooled feature onto the prior's target space:
    float ``[B, D_target]`` -> ``[B, d]`` (method.md, stage 2).

    Args:
        in_features: D_target.
        out_features: d.
        mode: one of :data:`TRANSFER_HEADS`; ``fixed`` (the reference) freezes the weights.

    Raises:
        ValueError: unknown ``mode``.
    """

    def __init__(self, in_features: int, out_features: int, mode: str = "fixed") -> None:
        if mode not in TRANSFER_HEADS:
            raise ValueError(f"unknown --transfer-head {mode!r}; choose one of {', '.join(TRANSFER_HEADS)}")
        super().__init__(in_features, out_features)
        self.requires_grad_(mode == "trained")


def rela_loss(prediction_1: torch.Tensor, prediction_2: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``0.5 * [(1 - cos(W h(v1), y)) + (1 - cos(W h(v2), y))]``, averaged over the batch.

    Args:
        prediction_1, prediction_2: ``W h(v)`` of the two views, float ``[B, d]``.
        targets: standardised prior targets ``y``, float ``[B, d]``.

    Returns:
        Scalar float32 tensor in [0, 2].
    """
    targets = targets.float()
    distance_1 = 1 - F.cosine_similarity(prediction_1.float(), targets, dim=1)
    distance_2 = 1 - F.cosine_similarity(prediction_2.float(), targets, dim=1)
    return 0.5 * (distance_1 + distance_2).mean()


@dataclass
class AdaptiveSwitch:
    """The reference rule that ends the ReLA phase once its loss has plateaued.

    At every optimiser step, with ``loss`` the ReLA loss (mean over ranks):
    first ``rho = exp(-max(L_slow - L_fast, 0))``, then
    ``L_fast = 0.999 L_fast + 0.001 loss`` and ``L_slow = 0.99 L_slow + 0.01 L_fast``;
    once ``rho >= 0.995`` training switches to the method's own loss for good.

    Attributes:
        fast, slow: the two running losses (initially 1.0 and 2.0).
        threshold: rho at which the switch happens.
        switched: whether the switch has happened.
    """

    fast: float = 1.0
    slow: float = 2.0
    threshold: float = 0.995
    switched: bool = False

    def update(self, loss: float) -> float:
        """Feed one step's ReLA loss; returns that step's rho (in (0, 1])."""
        rho = math.exp(-max(self.slow - self.fast, 0.0))
        self.fast = 0.999 * self.fast + 0.001 * loss
        self.slow = 0.99 * self.slow + 0.01 * self.fast
        self.switched = self.switched or rho >= self.threshold
        return rho


def parse_rela(spec: str) -> tuple[str, float]:
    """``"guarded[:<c>]"`` | ``"adaptive"`` | ``"static:<c>"`` | ``"off"`` -> ``(mode, c)``.

    ``guarded`` (our addition, :mod:`rela_train.handover`): the reference's plateau rule proposes a hand-over and
    the online kNN monitor decides it; ``guarded:<c>`` also proposes one from epoch ``int(c * epochs)`` on (``c``
    is 1 for plain ``guarded``: never); ``adaptive``: the reference's plateau rule hands over (:class:`AdaptiveSwitch`);
    ``static:<c>`` keeps ReLA while ``epoch < int(c * epochs)`` (the reference's static rule, method.md stage 2;
    see :func:`static_rela_epochs`); ``off`` trains the plain method from the first step.

    Raises:
        ValueError: any other spelling, or ``c`` outside [0, 1].
    """
    if spec in ("adaptive", "off"):
        return spec, 0.0
    if spec == "guarded":
        return spec, 1.0
    if spec.startswith(("static:", "guarded:")):
        try:
            fraction = float(spec.split(":", 1)[1])
        except ValueError:
            fraction = -1.0
        if 0 <= fraction <= 1:
            return spec.split(":", 1)[0], fraction
    raise ValueError(f"--rela must be guarded, guarded:<c>, adaptive, off or static:<c> with 0 <= c <= 1, got {spec!r}")


def static_rela_epochs(fraction: float, epochs: int) -> int:
    """Epochs trained with the ReLA loss under ``--rela static:<c>``: ``int(c * epochs)``, as the
    reference code (``current_epoch < int(conlam * epochs)``; method.md, stage 2)."""
    return int(fraction * epochs)
