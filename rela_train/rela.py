"""The ReLA loss and when to stop using it (method.md, stage 2).

Sun, Jiang, Lin, "Efficiency for Free: Ideal Data Are Transportable
Representations", NeurIPS 2024, Sec. 4.2 (ReLA-F) and the authors' reference code.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

#: ``fixed``: ``W`` keeps its random initialisation (the reference: it is not among the optimiser's
#: parameters, so the backbone alone must fit the targets through a fixed random map); ``trained``:
#: ``W`` is optimised with the backbone (AdamW, with weight decay), this project's earlier default.
TRANSFER_HEADS = ("fixed", "trained")


#: Separates the transfer head's seed from the backbone's (both come from ``--seed``).
TRANSFER_SEED_SALT = "rela-transfer-head"


def transfer_seed(seed: int) -> int:
    """The seed (an int in ``[0, 2**63)``) of the transfer head's initialisation for a run seeded with ``seed``."""
    digest = hashlib.blake2b(f"{TRANSFER_SEED_SALT}:{seed}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


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


class ReLAObjective(nn.Linear):
    """The ReLA loss of a backbone's two views, through the linear "transfer" head ``W: D_target -> d`` (with
    bias) that maps the backbone's pooled feature onto the prior's target space (method.md, stage 2; Sun, Jiang,
    Lin, NeurIPS 2024, Sec. 4.2). The module *is* that head (``weight`` float32 ``[d, D_target]``, ``bias``
    ``[d]``; :meth:`project` applies it); :meth:`forward` returns the loss.

    ``W`` has PyTorch's default ``nn.Linear`` initialisation, drawn from a generator seeded by ``seed`` alone
    (:func:`transfer_seed`; the global generator is left untouched), so the same seed gives the same head
    whatever was built before it.

    Args:
        feature_dim: D_target, the backbone's feature size (512 for ResNet-18).
        target_dim: d, the targets' size (``min(D_target, D_prior)``, what :func:`rela_train.rela_loader` yields
            for ``target_dim=D_target``).
        transfer_head: one of :data:`TRANSFER_HEADS`: ``fixed`` (the reference, default) freezes ``W``
            (``requires_grad`` False: give the optimiser the backbone's parameters only, or filter on
            ``requires_grad``); ``trained`` lets the optimiser fit it.
        seed: the initialisation's seed (``rela train --seed``).

    Raises:
        ValueError: unknown ``transfer_head``, or a size below 1.

    Example::

        objective = ReLAObjective(512, batch["target"].shape[1])
        loss = objective(backbone(batch["view1"]), backbone(batch["view2"]), batch["target"])
    """

    def __init__(self, feature_dim: int, target_dim: int, transfer_head: str = "fixed", seed: int = 0) -> None:
        if transfer_head not in TRANSFER_HEADS:
            raise ValueError(f"unknown transfer head {transfer_head!r}; choose one of {', '.join(TRANSFER_HEADS)}")
        if feature_dim < 1 or target_dim < 1:
            raise ValueError(f"feature_dim and target_dim must be at least 1, got {feature_dim} and {target_dim}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(transfer_seed(seed))
            super().__init__(feature_dim, target_dim)
        self.requires_grad_(transfer_head == "trained")

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """``W h``: float ``[B, D_target]`` -> ``[B, d]``."""
        return super().forward(features)

    def forward(self, features_1: torch.Tensor, features_2: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The ReLA loss (:func:`rela_loss`) of the backbone's features of the two views.

        Args:
            features_1, features_2: ``h(v1)``, ``h(v2)``: float ``[B, D_target]``.
            targets: standardised prior targets, float ``[B, d]`` (the ``"target"`` of :func:`rela_train.rela_loader`).

        Returns:
            Scalar float32 tensor in [0, 2] (differentiable w.r.t. the features).

        Raises:
            ValueError: features or targets of the wrong size.
        """
        if features_1.shape[-1] != self.in_features or targets.shape[-1] != self.out_features:
            raise ValueError(
                f"ReLAObjective({self.in_features}, {self.out_features}) got features of size {features_1.shape[-1]} "
                f"and targets of size {targets.shape[-1]}"
            )
        return rela_loss(self.project(features_1), self.project(features_2), targets)


@dataclass
class AdaptiveSwitch:
    """The reference rule that ends the ReLA phase once its loss has plateaued (method.md, stage 2; the authors'
    reference code).

    At every optimiser step, with ``loss`` the ReLA loss (mean over ranks under data parallelism):
    first ``rho = exp(-max(L_slow - L_fast, 0))``, then
    ``L_fast = 0.999 L_fast + 0.001 loss`` and ``L_slow = 0.99 L_slow + 0.01 L_fast``;
    once ``rho >= 0.995`` training switches to the method's own loss for good.

    Attributes:
        fast, slow: the two running losses (initially 1.0 and 2.0).
        threshold: rho at which the switch happens.
        switched: whether the switch has happened.
        rho: the last step's rho, in (0, 1] (None before the first :meth:`update`).

    Example::

        switch = AdaptiveSwitch()
        if not switch.switched:
            loss = objective(h1, h2, target)
            ...
            switch.update(loss.item())
    """

    fast: float = 1.0
    slow: float = 2.0
    threshold: float = 0.995
    switched: bool = False
    rho: float | None = None

    def update(self, loss: float) -> bool:
        """Feed one step's ReLA loss (a float; a tensor is read with ``float()``); returns :attr:`switched`.

        Raises:
            ValueError: a loss that is not finite.
        """
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"AdaptiveSwitch.update needs a finite loss, got {loss}")
        self.rho = math.exp(-max(self.slow - self.fast, 0.0))
        self.fast = 0.999 * self.fast + 0.001 * loss
        self.slow = 0.99 * self.slow + 0.01 * self.fast
        self.switched = self.switched or self.rho >= self.threshold
        return self.switched

    def state_dict(self) -> dict:
        """The rule's state (plain floats and a bool), for a checkpoint."""
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (one saved before :attr:`rho` existed leaves it None).

        Raises:
            TypeError: an unknown field.
        """
        unknown = set(state) - {field.name for field in fields(self)}
        if unknown:
            raise TypeError(f"AdaptiveSwitch state has unknown fields {sorted(unknown)}")
        for name, value in state.items():
            setattr(self, name, value)


class StaticSwitch:
    """The reference's static rule: ReLA while ``epoch < int(c * epochs)``, then the method (the reference code's
    ``current_epoch < int(conlam * epochs)``; method.md, stage 2).

    Args:
        c: the fraction of the epochs trained with ReLA, in [0, 1].
        epochs: the run's epochs.

    Attributes:
        rela_epochs: ``int(c * epochs)``, the epochs trained with the ReLA loss.

    Raises:
        ValueError: ``c`` outside [0, 1] or negative ``epochs``.
    """

    def __init__(self, c: float, epochs: int) -> None:
        if not 0 <= c <= 1 or epochs < 0:
            raise ValueError(f"StaticSwitch needs 0 <= c <= 1 and epochs >= 0, got c={c}, epochs={epochs}")
        self.c, self.epochs = c, epochs
        self.rela_epochs = int(c * epochs)

    def update(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based, the one about to be trained) trains the method (True: switched)."""
        return epoch >= self.rela_epochs


def parse_rela(spec: str) -> tuple[str, float]:
    """``"guarded[:<c>]"`` | ``"adaptive"`` | ``"static:<c>"`` | ``"off"`` -> ``(mode, c)``.

    ``guarded`` (our addition, :mod:`rela_train.handover`): the reference's plateau rule proposes a hand-over and
    the online kNN monitor decides it; ``guarded:<c>`` also proposes one from epoch ``int(c * epochs)`` on (``c``
    is 1 for plain ``guarded``: never); ``adaptive``: the reference's plateau rule hands over (:class:`AdaptiveSwitch`);
    ``static:<c>`` keeps ReLA while ``epoch < int(c * epochs)`` (the reference's static rule, method.md stage 2;
    see :class:`StaticSwitch`); ``off`` trains the plain method from the first step.

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
