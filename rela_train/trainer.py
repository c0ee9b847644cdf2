"""``rela train``: self-supervised training accelerated by the ReLA loss (ReLA-F).

While ReLA is active the optimiser sees only the ReLA loss (lambda = 1) and the
method's bookkeeping (BYOL's momentum update) still runs every step; once the
ReLA loss plateaus (adaptive rule) or after ``c * epochs`` epochs (static rule)
training continues with the method's own loss and views for good (method.md,
stage 2; Sun, Jiang, Lin, NeurIPS 2024, Sec. 4.2). ``--rela off`` runs the same
code with ReLA never active, so comparisons are fair: same initialisation, same
data order, same optimiser.

Under ``torchrun`` (or ``--nproc``) every process trains a replica wrapped in
``DistributedDataParallel`` on its own share of each epoch (see
:mod:`rela_train.data`); all ranks run the same number of steps, and the ReLA
loss fed to the switch is the mean over ranks, so every rank switches at the
same step.

Batch norm is synchronised across GPU processes (``SyncBatchNorm``), as in the reference; PyTorch
implements it for GPUs only, so CPU processes (gloo) keep per-process batch statistics.

Outputs in RUN (written by rank 0): ``config.json``, ``metrics.jsonl`` (one JSON
line per logged step, plus one per online kNN evaluation with ``--monitor-*``; the
same numbers as TensorBoard scalars in ``tensorboard/`` unless TensorBoard is off,
:mod:`rela_train.metrics`), ``summary.json`` and ``checkpoint.pt`` (saved atomically
after every epoch, :mod:`rela_train.checkpoint`; a killed run resumes from it when
started again with the same options).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rela_convert.devices import resolve_device
from rela_convert.distributed import Ranks
from rela_convert.index import write_json_atomic
from rela_train.backbones import build_backbone, resolve_stem
from rela_train.checkpoint import CheckpointError, TrainingState
from rela_train.data import ConvertedDataset, TrainStream
from rela_train.methods import METHODS, MethodSettings
from rela_train.methods.base import resolved_option
from rela_train.metrics import MetricsLog, tensorboard_available
from rela_train.monitor import KNNMonitor
from rela_train.rela import TransferHead, parse_rela, rela_loss, static_rela_epochs
from rela_train.subset import load_strategy


class TrainingError(RuntimeError):
    """The run cannot start or resume; the message says why."""


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``rela train``; defaults from method.md (BYOL on CIFAR-sized data).

    ``lr``, ``weight_decay`` and ``momentum`` default (None) to the method's own defaults
    (:attr:`rela_train.methods.Method.defaults`, else :data:`rela_train.methods.base.SHARED_DEFAULTS`).
    ``data_ratio`` and ``input_size`` default (None) to the converted dataset's
    recorded data ratio and the data's own image size (the median shorter side the
    conversion saw, at most 224 px: 32 for CIFAR; never the prior's input size,
    method.md stage 2); ``storage`` (None) to the dataset's default format;
    ``subset`` (None) to the dataset's recorded subset strategy
    (:mod:`rela_train.subset`). ``batch_size`` is per process. ``stem`` is one of
    :data:`rela_train.backbones.STEMS` (stored resolved); ``transfer_head`` one of
    :data:`rela_train.rela.TRANSFER_HEADS` (``fixed``: the reference). The
    ``monitor_*`` options name two labelled folders for the online kNN monitor,
    evaluated every ``monitor_every`` steps (:mod:`rela_train.monitor`).
    """

    arch: str = "resnet18"
    method: str = "byol"
    rela: str = "adaptive"
    epochs: int = 100
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    data_ratio: float | None = None
    input_size: int | None = None
    storage: str | None = None
    workers: int = 2
    device: str = "auto"
    seed: int = 0
    shuffle_buffer: int = 2000
    log_every: int = 10
    subset: str | None = None
    stem: str = "auto"
    transfer_head: str = "fixed"
    monitor_train: str | None = None
    monitor_test: str | None = None
    monitor_every: int = 0

    def resolved(self, dataset: ConvertedDataset) -> TrainConfig:
        """This config with the defaults that come from the dataset (data ratio, input size, storage,
        subset strategy) and from the method (lr, weight decay, momentum) filled in and the stem
        resolved: what a run records and resumes by.

        Raises:
            rela_convert.registry.RegistryError: unknown method.
            ValueError: the method needs labels and the dataset has no class folders.
        """
        method = METHODS.get(self.method)
        if method.needs_labels and not dataset.index.classes:
            raise ValueError(
                f"--method {self.method} trains on class labels, but {dataset.root} was converted from a tree "
                "without class folders"
            )
        input_size = self.input_size or dataset.train_size
        return replace(
            self,
            lr=resolved_option(method, "lr", self.lr),
            weight_decay=resolved_option(method, "weight_decay", self.weight_decay),
            momentum=resolved_option(method, "momentum", self.momentum),
            data_ratio=self.data_ratio or float(dataset.index.subset["data_ratio"]),
            input_size=input_size,
            storage=dataset.storage,
            subset=self.subset or dataset.index.subset["strategy"],
            stem=resolve_stem(self.stem, input_size, self.arch),
        )


class ReLAModel(nn.Module):
    """A training method plus the ReLA transfer head; ``forward`` returns the step's loss.

    Args:
        method: a :class:`rela_train.methods.Method` (has ``backbone`` and ``loss``).
        feature_dim: D_target of the backbone.
        target_dim: d = min(D_target, D_prior).
        transfer_head: ``fixed`` (the reference: ``W`` keeps its random initialisation) or ``trained``.
    """

    def __init__(self, method: nn.Module, feature_dim: int, target_dim: int, transfer_head: str = "fixed") -> None:
        super().__init__()
        self.method = method
        self.transfer = TransferHead(feature_dim, target_dim, transfer_head)

    def forward(
        self, view_1: torch.Tensor, view_2: torch.Tensor, targets: torch.Tensor | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """ReLA loss of the two views against ``targets`` (float ``[B, d]``) or, when
        ``targets`` is None, the method's own loss (``labels`` int64 ``[B]``, -1: none); scalar."""
        if targets is None:
            return self.method.loss(view_1, view_2, labels)
        backbone = self.method.backbone
        return rela_loss(self.transfer(backbone(view_1)), self.transfer(backbone(view_2)), targets)


class Trainer:
    """Holds the networks, optimiser, switch state and data stream of one run.

    Args:
        data: converted dataset folder.
        run: output folder.
        config: :class:`TrainConfig`.
        tensorboard: also log the metrics to TensorBoard (``RUN/tensorboard/``); None: when the
            ``tensorboard`` package is installed.

    Attributes:
        state: the :class:`rela_train.checkpoint.TrainingState` (model, optimiser, switch, epoch, step,
            switch step) that every epoch's checkpoint saves.

    Raises:
        DatasetError: ``data`` is not a converted dataset.
        TrainingError: ``run`` holds a run with other options, or ``tensorboard`` is True without the
            ``tensorboard`` package.
        ValueError: an unknown arch, stem, method, transfer head, storage or ``--rela``
            spelling, a subset smaller than one step, only one of the two monitor folders, or a
            method that needs labels on a dataset without class folders.
    """

    def __init__(self, data: str | Path, run: str | Path, config: TrainConfig, tensorboard: bool | None = None) -> None:
        if tensorboard and not tensorboard_available():
            raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard")
        self.tensorboard = tensorboard_available() if tensorboard is None else tensorboard
        self.dataset = ConvertedDataset(data, config.storage)
        self.run = Path(run)
        self.mode, self.static_fraction = parse_rela(config.rela)
        if (config.monitor_train is None) != (config.monitor_test is None):
            raise ValueError("give both --monitor-train and --monitor-test, or neither")
        self.config = config = config.resolved(self.dataset)
        device = resolve_device(config.device)
        self.ranks = Ranks.from_environment("nccl" if device.type == "cuda" else "gloo")
        self.device = (
            torch.device("cuda", self.ranks.local_rank) if device.type == "cuda" and self.ranks.world > 1 else device
        )
        method_class = METHODS.get(config.method)
        self.stream = TrainStream(
            self.dataset,
            config.input_size,
            method_class.views(config.input_size),
            config.data_ratio,
            config.seed,
            config.batch_size,
            self.ranks.rank,
            self.ranks.world,
            config.shuffle_buffer,
            load_strategy(self.dataset.root, self.dataset.index, config.subset, self.dataset.keys),
        )
        self.steps_per_epoch = self.stream.plan().steps
        torch.manual_seed(config.seed)
        backbone, self.feature_dim = build_backbone(config.arch, config.input_size, config.stem)
        settings = MethodSettings(
            feature_dim=self.feature_dim,
            input_size=config.input_size,
            num_classes=len(self.dataset.index.classes),
            momentum=config.momentum,
            total_steps=self.steps_per_epoch * config.epochs,
            steps_per_epoch=self.steps_per_epoch,
        )
        method = method_class(backbone, settings)
        target_dim = min(self.feature_dim, self.dataset.pca.feature_dim)
        self.model = ReLAModel(method, self.feature_dim, target_dim, config.transfer_head)
        if self.ranks.world > 1 and self.device.type == "cuda":  # the reference trains with synchronised batch norm;
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # PyTorch syncs it on GPUs only
        self.model = self.model.to(self.device)
        self.pca_mean, self.pca_weight = (t.to(self.device) for t in self.dataset.pca.projection(self.feature_dim))
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
        )
        self.state = TrainingState(
            config=asdict(config),
            data=str(self.dataset.root.resolve()),
            world_size=self.ranks.world,
            feature_dim=self.feature_dim,
            model=self.model,
            optimizer=self.optimizer,
        )
        self.metrics: MetricsLog | None = None  # rank 0, while fit runs
        self.monitor = None
        if config.monitor_train and config.monitor_every and self.is_main:
            self.monitor = KNNMonitor(config.monitor_train, config.monitor_test, config.input_size)
        self.forward = self.model
        if self.ranks.world > 1:
            # Each phase leaves some parameters unused (the transfer head, or the BYOL heads).
            self.forward = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )

    @property
    def is_main(self) -> bool:
        return self.ranks.rank == 0

    @property
    def epoch(self) -> int:
        """Epochs finished."""
        return self.state.epoch

    @property
    def step(self) -> int:
        """Optimiser steps taken."""
        return self.state.step

    @property
    def switch_step(self) -> int | None:
        """The step at which ReLA ended; None while it has not."""
        return self.state.switch_step

    def rela_active(self) -> bool:
        """Whether the next step optimises the ReLA loss."""
        if self.mode == "off":
            return False
        if self.mode == "static":
            return self.state.epoch < static_rela_epochs(self.static_fraction, self.config.epochs)
        return not self.state.switch.switched

    def _note_switch(self, was_rela: bool) -> None:
        """Record the step at which ReLA ended and give the workers the method's views."""
        if was_rela and not self.rela_active():
            self.state.switch_step = self.state.step
            self.stream.set_phase(rela=False)

    @property
    def finished(self) -> bool:
        """Whether RUN holds this run finished (all epochs trained and summary.json written)."""
        return self.state.epoch >= self.config.epochs and (self.run / "summary.json").is_file()

    @property
    def images_seen(self) -> int:
        """Training images consumed so far over all ranks (steps x batch x world)."""
        return self.state.step * self.config.batch_size * self.ranks.world

    def _resume(self) -> bool:
        """Restore RUN's checkpoint when it has one (only the counters when the run is finished);
        returns whether it had one."""
        try:
            saved = self.state.load(self.run, map_location=self.device)
        except CheckpointError as error:
            raise TrainingError(str(error)) from None
        if saved is None:
            return False
        self.state.restore_progress(saved)
        if not self.finished:  # a finished run needs no training state
            self.state.restore_training(saved)
        return True

    def _monitor(self) -> None:
        """Rank 0: log the online kNN accuracy of the backbone now (``{"epoch", "step", "images_seen",
        "monitor_knn_top1", "seconds"}``); other ranks wait."""
        if self.monitor is not None:
            started = time.perf_counter()
            accuracy = self.monitor(self.model.method.backbone, self.device)
            self.metrics.write(
                {
                    "epoch": self.state.epoch,
                    "step": self.state.step,
                    "images_seen": self.images_seen,
                    "monitor_knn_top1": accuracy,
                    "seconds": time.perf_counter() - started,
                }
            )
        self.ranks.barrier()

    def _log_step(self, rela: bool, loss: float, rho: float | None, images_per_s: float) -> dict:
        """Rank 0: log the step just taken; returns the record."""
        record = {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "images_seen": self.images_seen,
            "phase": "rela" if rela else "ssl",
            "loss": loss,
            "rela_loss": loss if rela else None,
            "rho": rho,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": images_per_s,
        }
        self.metrics.write(record)
        return record

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.detach().float()
        if self.ranks.world > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.ranks.world
        return float(value)

    def train_step(
        self, view_1: torch.Tensor, view_2: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, rela: bool
    ) -> float:
        """One optimiser step on a batch, then the method's bookkeeping; returns the loss, averaged over ranks."""
        view_1 = view_1.to(self.device, non_blocking=True)
        view_2 = view_2.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        targets = (features.to(self.device, non_blocking=True) - self.pca_mean) @ self.pca_weight if rela else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.forward(view_1, view_2, targets, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.method.after_step(self.state.step)
        return self._mean_over_ranks(loss)

    def fit(self, progress: bool = True) -> dict:
        """Train for the configured epochs (resuming from ``RUN/checkpoint.pt`` if present).

        Returns:
            The summary written to ``RUN/summary.json``: ``epochs``, ``steps``,
            ``switch_step`` (None if ReLA never ended), ``images_per_s`` (training
            throughput of this call over all ranks), ``seconds``; when RUN already
            holds the finished run, its stored summary with ``already_done: True``.
        """
        self.run.mkdir(parents=True, exist_ok=True)
        resumed = self._resume()
        if self.finished:
            return {**json.loads((self.run / "summary.json").read_text()), "already_done": True}
        state, config = self.state, self.config
        if self.is_main:
            write_json_atomic(
                self.run / "config.json", {**state.config, "data": state.data, "world_size": state.world_size}
            )
            self.metrics = MetricsLog(self.run, self.tensorboard)
        try:
            if resumed and self.metrics is not None:
                self.metrics.truncate_after(state.step)
            loader = self.stream.loader(config.workers, pin_memory=self.device.type == "cuda")
            started, images = time.perf_counter(), 0
            self.model.train()
            if state.step == 0:
                self._monitor()
            while state.epoch < config.epochs:
                self.stream.set_epoch(state.epoch)
                rela = self.rela_active()
                self.stream.set_phase(rela)
                window_start, window_images = time.perf_counter(), 0  # throughput since the last log line
                bar = tqdm(
                    loader,
                    total=self.steps_per_epoch,
                    desc=f"epoch {state.epoch + 1}/{config.epochs}",
                    unit="step",
                    disable=not (progress and self.is_main),
                )
                for view_1, view_2, features, labels in bar:
                    rela = self.rela_active()
                    loss = self.train_step(view_1, view_2, features, labels, rela)
                    rho = state.switch.update(loss) if rela and self.mode == "adaptive" else None
                    state.step += 1
                    batch_images = len(view_1) * self.ranks.world
                    window_images += batch_images
                    images += batch_images
                    self._note_switch(rela)
                    if self.metrics is not None and state.step % config.log_every == 0:
                        rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                        record = self._log_step(rela, loss, rho, rate)
                        bar.set_postfix(phase=record["phase"], loss=f"{loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
                        window_start, window_images = time.perf_counter(), 0
                    if config.monitor_every and state.step % config.monitor_every == 0:
                        self._monitor()
                        window_start = time.perf_counter()
                bar.close()
                state.epoch += 1
                if state.epoch < config.epochs:  # ReLA that lasts to the end never switched
                    self._note_switch(rela)
                if state.epoch == config.epochs and config.monitor_every and state.step % config.monitor_every:
                    self._monitor()
                if self.is_main:
                    state.save(self.run)
                self.ranks.barrier()
        finally:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
        seconds = time.perf_counter() - started
        summary = {
            "epochs": state.epoch,
            "steps": state.step,
            "switch_step": state.switch_step,
            "images_seen": self.images_seen,
            "images_per_s": images / max(seconds, 1e-9),
            "seconds": seconds,
            "world_size": self.ranks.world,
        }
        if self.is_main:
            write_json_atomic(self.run / "summary.json", summary)
        self.ranks.close()
        return summary
