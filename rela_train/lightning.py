"""ReLA for PyTorch Lightning: the converted data as a ``LightningDataModule`` and the ReLA phase as a callback
(needs pytorch-lightning; Sun, Jiang, Lin, NeurIPS 2024, Sec. 4.2; method.md, stage 2).

An existing ``LightningModule`` (e.g. lightly's BYOL example) gains the ReLA phase with three lines in its
``training_step`` (after its own bookkeeping, such as BYOL's momentum update, which runs in both phases, as the
reference)::

    def training_step(self, batch, batch_idx):
        update_momentum(self.backbone, self.backbone_momentum, m=0.99)
        loss = rela_step(self, batch)  # the ReLA loss while the ReLA phase lasts, else None
        if loss is not None:
            return loss
        ...  # the module's own loss on batch["view1"], batch["view2"]

    trainer = pl.Trainer(callbacks=[ReLACallback(feature_dim=512)], reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, datamodule=ReLADataModule("data", batch_size=128))

The module must hold its backbone as ``self.backbone`` (or name it: ``ReLACallback(backbone=...)``), returning a
pooled feature (``[B, D]``, or ``[B, D, 1, 1]`` as lightly's ``nn.Sequential`` ResNets: flattened). Under data
parallelism the phases leave some parameters unused: use ``strategy="ddp_find_unused_parameters_true"`` (or
``DDPStrategy(find_unused_parameters=True)``). Our simplifications against ``rela train``: an adaptive switch within
an epoch changes the loss at once and the views from the next epoch (``rela train`` restarts the epoch's stream);
the switch rules are the reference's (adaptive, static) with ``rela train``'s learning-rate ramp
(``handover_ramp``), not ``--rela guarded``, which needs the online kNN monitor and a copy of the model and
optimiser to roll back to (:mod:`rela_train.handover`), and ``--handover warm``, which needs the method's head loss
on ReLA's features (a :class:`rela_train.methods.Method`, not a user's module).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.optional import require
from rela_train.handover import handover_lr_factor
from rela_train.loader import RELA_VIEWS, open_dataset, rela_loader
from rela_train.rela import AdaptiveSwitch, ReLAObjective, StaticSwitch

pl = require("pytorch_lightning", "rela_train.lightning")

#: The attribute of the LightningModule that holds the callback's :class:`~rela_train.rela.ReLAObjective`.
OBJECTIVE_ATTRIBUTE = "rela_objective"


class ReLADataModule(pl.LightningDataModule):
    """A converted dataset as a ``LightningDataModule``: every epoch's ``train_dataloader`` is :func:`rela_train.
    rela_loader` of that epoch (a fresh distilled subset), for this process's rank. Needs
    ``pl.Trainer(reload_dataloaders_every_n_epochs=1)``.

    Args:
        data: a :class:`ConvertedDataset`, or its folder or URL.
        batch_size, input_size, data_ratio, seed, workers, cache_dir, augment: as :func:`rela_train.rela_loader`
            (``augment="auto"``: the views made by NVIDIA DALI in the workers when it is installed).

    Attributes:
        views: the views of the epoch: ``"rela"``, a method's name, or a function of the epoch giving one
            (what :class:`ReLACallback` sets: ReLA's views, then ``method_views``).
        target_dim: ``target_dim`` of :func:`rela_train.rela_loader` (:class:`ReLACallback` sets its feature_dim).
        dataset: the opened :class:`ConvertedDataset` (after :meth:`setup`).
    """

    def __init__(
        self,
        data: ConvertedDataset | str | Path,
        *,
        batch_size: int,
        input_size: int | None = None,
        data_ratio: float | None = None,
        seed: int = 0,
        workers: int = 2,
        cache_dir: str | Path | None = None,
        augment: str = "auto",
    ) -> None:
        super().__init__()
        self.data, self.cache_dir, self.augment = data, cache_dir, augment
        self.batch_size, self.input_size, self.data_ratio = batch_size, input_size, data_ratio
        self.seed, self.workers = seed, workers
        self.views = RELA_VIEWS
        self.target_dim: int | None = None
        self.dataset: ConvertedDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Open the dataset (once)."""
        if self.dataset is None:
            self.dataset = open_dataset(self.data, self.cache_dir)

    def train_dataloader(self):
        """:func:`rela_train.rela_loader` of the trainer's current epoch, rank and world size.

        Raises:
            ValueError: the trainer does not reload the DataLoader every epoch.
        """
        trainer = self.trainer
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError(
                "ReLADataModule draws a new subset every epoch: pass pl.Trainer(reload_dataloaders_every_n_epochs=1)"
            )
        self.setup()
        epoch = trainer.current_epoch
        return rela_loader(
            self.dataset,
            batch_size=self.batch_size,
            input_size=self.input_size,
            data_ratio=self.data_ratio,
            seed=self.seed,
            epoch=epoch,
            workers=self.workers,
            views=self.views(epoch) if callable(self.views) else self.views,
            target_dim=self.target_dim,
            rank=trainer.global_rank,
            world=trainer.world_size,
            augment=self.augment,
        )


class ReLACallback(pl.Callback):
    """The ReLA phase for a ``LightningModule`` trained on a :class:`ReLADataModule`: the objective, the switch
    and the hand-over to the module's own loss and views; the switch's state is saved in Lightning checkpoints.

    While ReLA is active, :func:`rela_step` returns the ReLA loss of the batch (:class:`~rela_train.rela.
    ReLAObjective` on the module's backbone features of ``view1`` and ``view2``); after each step the loss, averaged
    over processes, feeds the :class:`~rela_train.rela.AdaptiveSwitch` (so every process switches at the same
    step); after the switch :func:`rela_step` returns None and the data module serves ``method_views`` from the next
    epoch on. Logged: ``rela_loss``, ``rela_rho``, ``rela_active``. With ``handover_ramp`` N, the learning rate of
    every parameter group is scaled by :func:`~rela_train.handover.handover_lr_factor` for the method's first N
    steps (``1/N``, ``2/N``, ...: ``--handover-ramp``), and restored after each step, so that a learning-rate
    scheduler sees its own values.

    Args:
        feature_dim: D_target, the backbone's feature size (512 for ResNet-18).
        switch: an :class:`~rela_train.rela.AdaptiveSwitch` (default, the reference rule) or a
            :class:`~rela_train.rela.StaticSwitch` (ReLA for its first ``int(c * epochs)`` epochs).
        method_views: the views after the switch: a method's name (``"byol"``, ``"simclr"``, ...).
        transfer_head, seed: as :class:`~rela_train.rela.ReLAObjective` (``trained``: the module's
            ``configure_optimizers`` must include its parameters, e.g. through ``self.parameters()``).
        backbone: the module's attribute holding the backbone.
        handover_ramp: steps of the learning-rate ramp after the switch (0: none, the reference).

    Attributes:
        switch_step: the global step at which ReLA ended (None while it has not).

    Raises:
        TypeError: ``switch`` of another kind; (at setup) a data module that is not a :class:`ReLADataModule`.
        ValueError: a negative ``handover_ramp``.
        AttributeError: (at setup) a module without the ``backbone`` attribute.
    """

    def __init__(
        self,
        feature_dim: int,
        switch: AdaptiveSwitch | StaticSwitch | None = None,
        method_views: str = "byol",
        transfer_head: str = "fixed",
        seed: int = 0,
        backbone: str = "backbone",
        handover_ramp: int = 0,
    ) -> None:
        if switch is not None and not isinstance(switch, (AdaptiveSwitch, StaticSwitch)):
            raise TypeError(f"switch is an AdaptiveSwitch or a StaticSwitch, not {type(switch).__name__}")
        if handover_ramp < 0:
            raise ValueError(f"handover_ramp is a number of steps >= 0, not {handover_ramp}")
        self.feature_dim, self.method_views = feature_dim, method_views
        self.transfer_head, self.seed, self.backbone = transfer_head, seed, backbone
        self.switch = switch if switch is not None else AdaptiveSwitch()
        self.handover_ramp = handover_ramp
        self.switch_step: int | None = None
        self._scheduled_lrs: list[list[float]] | None = None

    def rela_active(self, epoch: int) -> bool:
        """Whether steps of epoch ``epoch`` (0-based) optimise the ReLA loss (with the adaptive rule: until it
        has switched)."""
        if isinstance(self.switch, StaticSwitch):
            return not self.switch.update(epoch)
        return not self.switch.switched

    def views_of(self, epoch: int) -> str:
        """The views the data module serves in epoch ``epoch``."""
        return RELA_VIEWS if self.rela_active(epoch) else self.method_views

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Give the module its :class:`~rela_train.rela.ReLAObjective` (attribute ``rela_objective``, so that it
        moves, is saved and, ``trained``, is optimised with the module) and tell the data module the views and
        target size."""
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ReLADataModule):
            raise TypeError(f"ReLACallback trains on a ReLADataModule, not {type(datamodule).__name__}")
        if not hasattr(pl_module, self.backbone):
            raise AttributeError(f"{type(pl_module).__name__} has no backbone attribute {self.backbone!r}")
        datamodule.setup(stage)
        datamodule.views, datamodule.target_dim = self.views_of, self.feature_dim
        if not hasattr(pl_module, OBJECTIVE_ATTRIBUTE):
            target_dim = min(self.feature_dim, datamodule.dataset.pca.feature_dim)
            objective = ReLAObjective(self.feature_dim, target_dim, self.transfer_head, self.seed)
            setattr(pl_module, OBJECTIVE_ATTRIBUTE, objective)
        pl_module.rela_callback = self

    def loss(self, pl_module, batch: dict) -> torch.Tensor | None:
        """The ReLA loss of ``batch`` (a :func:`rela_train.rela_loader` dict) for the module, or None once ReLA has
        ended (see :func:`rela_step`)."""
        if not self.rela_active(pl_module.current_epoch):
            return None
        backbone = getattr(pl_module, self.backbone)
        features_1, features_2 = (backbone(batch[view]).flatten(1) for view in ("view1", "view2"))
        loss = getattr(pl_module, OBJECTIVE_ATTRIBUTE)(features_1, features_2, batch["target"])
        pl_module.log("rela_loss", loss.detach(), prog_bar=True)
        return loss

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Record a static switch's step; scale the learning rates by the hand-over ramp's factor."""
        if self.switch_step is None and not self.rela_active(trainer.current_epoch):
            self.switch_step = trainer.global_step
        factor = handover_lr_factor(trainer.global_step, self.switch_step, self.handover_ramp)
        if factor == 1.0:
            return
        self._scheduled_lrs = [[group["lr"] for group in opt.param_groups] for opt in trainer.optimizers]
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= factor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Restore the learning rates the ramp scaled; feed the step's ReLA loss (mean over processes) to the
        adaptive switch; record the switch."""
        if self._scheduled_lrs is not None:
            for optimizer, lrs in zip(trainer.optimizers, self._scheduled_lrs):
                for group, lr in zip(optimizer.param_groups, lrs):
                    group["lr"] = lr
            self._scheduled_lrs = None
        if not isinstance(self.switch, AdaptiveSwitch) or self.switch.switched or outputs is None:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        mean = trainer.strategy.reduce(loss.detach().float(), reduce_op="mean")
        if self.switch.update(float(mean)):
            self.switch_step = trainer.global_step
        pl_module.log("rela_rho", float(self.switch.rho))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("rela_active", float(self.rela_active(trainer.current_epoch + 1)))

    def state_dict(self) -> dict:
        """The adaptive switch's state and the switch step, saved in Lightning checkpoints."""
        state = self.switch.state_dict() if isinstance(self.switch, AdaptiveSwitch) else {}
        return {"switch": state, "switch_step": self.switch_step}

    def load_state_dict(self, state_dict: dict) -> None:
        if isinstance(self.switch, AdaptiveSwitch):
            self.switch.load_state_dict(state_dict["switch"])
        self.switch_step = state_dict["switch_step"]


def rela_step(pl_module, batch: dict) -> torch.Tensor | None:
    """In a ``LightningModule``'s ``training_step``: the ReLA loss of ``batch`` while the ReLA phase lasts (return
    it), else None (compute the module's own loss).

    Raises:
        RuntimeError: the trainer has no :class:`ReLACallback`.
    """
    callback = getattr(pl_module, "rela_callback", None)
    if callback is None:
        raise RuntimeError("rela_step needs pl.Trainer(callbacks=[ReLACallback(...)])")
    return callback.loss(pl_module, batch)
