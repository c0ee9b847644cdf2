"""``rela train``: self-supervised training accelerated by the ReLA loss (ReLA-F).

While ReLA is active the optimiser sees only the ReLA loss (lambda = 1) for the
backbone and the method's bookkeeping (BYOL's momentum update) still runs every
step; once the ReLA loss plateaus (adaptive rule) or after ``c * epochs`` epochs
(static rule) training continues with the method's own loss and views for good
(method.md, stage 2; Sun, Jiang, Lin, NeurIPS 2024, Sec. 4.2). Our additions
(:mod:`rela_train.handover`, deliberate deviations from the reference): the default
``--rela guarded`` only tries the method when the plateau rule proposes it and keeps
it on the online kNN monitor's evidence (a rejected trial is rolled back), and the
default ``--handover warm`` fits the method's heads on detached features during
ReLA. ``--rela off`` runs the same code with ReLA never active, so comparisons are
fair: same initialisation, same data order, same optimiser.

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
:mod:`rela_train.metrics`), ``summary.json``, ``checkpoint.pt`` (saved atomically
after every epoch and every ``--save-every`` steps, :mod:`rela_convert.checkpoint`),
``verified_shards.json`` (the shards whose SHA-256 the run has checked, ``--verify-shards``)
and ``skipped.jsonl`` (one line per sample that could not be used: ``step``, ``epoch``,
``rank``, ``key``, ``shard``, ``reason``; every rank appends its own).

Training that survives: a run killed at any step (even with SIGKILL) and started again
with the same command resumes from its last checkpoint and ends with weights
bit-identical to an uninterrupted run's on the CPU (same process count and workers). The
checkpoint holds the model (with the methods' momentum networks and queues), optimiser,
switch, the position in the epoch and every process's random generators; the data are a
function of (seed, epoch, step) (:mod:`rela_train.data`), so the stream restarts at the
checkpoint's step. SIGTERM or SIGINT ends the current step, saves and stops the run
(:class:`TrainingInterrupted`; a second signal stops at once). A non-finite loss stops the
run (``--nan-policy stop``) or skips the step's update (``skip``; more than
:data:`MAX_CONSECUTIVE_SKIPS` in a row stop it). Samples that cannot be used are replaced
within their batch and listed in ``skipped.jsonl``; more than ``--max-bad`` of the samples
read stop the run. Every error that stops a run is one line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from rela_convert.backbones import build_backbone, resolve_stem
from rela_convert.checkpoint import CHECKPOINT_NAME, CheckpointError, run_finished
from rela_convert.dataset.files import write_atomic, write_json_atomic, write_jsonl_atomic
from rela_convert.dataset.subset import load_strategy
from rela_convert.devices import resolve_device
from rela_convert.distributed import Ranks
from rela_train.data import Batch, ConvertedDataset, TrainStream
from rela_train.device_views import DeviceViews, step_seed
from rela_train.handover import HANDOVERS, GuardedSwitch, handover_lr_factor
from rela_train.methods import METHODS, MethodSettings
from rela_train.methods.base import resolved_option
from rela_train.metrics import MetricsLog, tensorboard_available
from rela_train.monitor import KNNMonitor
from rela_train.rela import TransferHead, parse_rela, rela_loss, static_rela_epochs
from rela_train.run_state import TrainingState, rng_state, set_rng_state
from rela_train.views import rela_params

LOGGER = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot start, resume or go on; the message (one line) says why."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT stopped the run after a step, once its checkpoint was saved.

    Attributes:
        signal: the signal's number; ``exit_status`` is ``128 + signal`` (143 for SIGTERM, 130 for SIGINT),
            the status ``rela train`` exits with.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signal = signum
        self.exit_status = 128 + signum


#: ``--nan-policy skip`` stops the run when more steps than this in a row had a non-finite loss.
MAX_CONSECUTIVE_SKIPS = 10

#: Learning-rate schedules (:meth:`Trainer.lr_at`): ``constant`` (the reference) and ``cosine``.
LR_SCHEDULES = ("constant", "cosine")
#: Options of :class:`TrainConfig` that do not change what a run computes: another value may resume a run,
#: and they are not part of the checkpoint's ``config``.
RUNTIME_OPTIONS = ("save_every", "nan_policy", "max_bad", "verify_shards")

#: RUN/verified_shards.json: ``{"shards": {name: sha256}}``, the shards whose hash the run has checked.
VERIFIED_NAME = "verified_shards.json"
#: RUN/skipped.jsonl: one JSON line per sample that could not be used.
SKIPPED_NAME = "skipped.jsonl"
#: RUN/monitor_skipped.jsonl: one JSON line (``path``, ``reason``) per file the online kNN monitor left out.
MONITOR_SKIPPED_NAME = "monitor_skipped.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``rela train``; defaults from method.md (BYOL on CIFAR-sized data).

    ``lr``, ``weight_decay`` and ``momentum`` default (None) to the method's own defaults
    (:attr:`rela_train.methods.Method.defaults`, else :data:`rela_train.methods.base.SHARED_DEFAULTS`).
    ``lr_schedule`` is one of :data:`LR_SCHEDULES` (:meth:`Trainer.lr_at`; ``constant``: the reference).
    ``data_ratio`` and ``input_size`` default (None) to the converted dataset's
    recorded data ratio and the data's own image size (the median shorter side the
    conversion saw, at most 224 px: 32 for CIFAR; never the prior's input size,
    method.md stage 2); ``storage`` (None) to the dataset's default format;
    ``subset`` (None) to the dataset's recorded subset strategy
    (:mod:`rela_convert.dataset.subset`). ``batch_size`` is per process. ``stem`` is one of
    :data:`rela_convert.backbones.STEMS` (stored resolved); ``transfer_head`` one of
    :data:`rela_train.rela.TRANSFER_HEADS` (``fixed``: the reference). ``rela``: the switch rule
    (:func:`rela_train.rela.parse_rela`; ``guarded``, our default, decides the hand-over on the monitor's evidence,
    ``adaptive`` is the reference's); ``handover``: one of :data:`rela_train.handover.HANDOVERS` (``warm``, our
    default: the method's heads fitted on detached features during ReLA; ``reference``: cold heads);
    ``handover_ramp``: steps over which the learning rate rises from 0 after the switch (0: none; the reference
    keeps it). The
    ``monitor_*`` options name two labelled folders for the online kNN monitor,
    evaluated every ``monitor_every`` steps (:mod:`rela_train.monitor`; stored as absolute paths, symbolic
    links kept, so that a run resumes from any working folder). ``augment``:
    ``cpu`` (the DataLoader workers make the views) or ``device`` (the workers only decode; both
    views are made on the training device, :mod:`rela_train.device_views`).

    Run-time options (:data:`RUNTIME_OPTIONS`: a run may resume with other values):
    ``save_every``: also save the checkpoint every this many steps (0: at epoch ends only);
    ``nan_policy``: ``stop`` (a non-finite loss stops the run) or ``skip`` (its step makes no
    update); ``max_bad``: the fraction of the samples read (counted over at least one epoch)
    that may be unusable before the run stops; ``verify_shards``: ``first`` (check each shard's
    SHA-256 the first time the run reads it) or ``off``.
    """

    arch: str = "resnet18"
    method: str = "byol"
    rela: str = "guarded"
    handover: str = "warm"
    handover_ramp: int = 0
    epochs: int = 100
    batch_size: int = 128
    lr: float | None = None
    lr_schedule: str = "constant"
    weight_decay: float | None = None
    momentum: float | None = None
    data_ratio: float | None = None
    input_size: int | None = None
    storage: str | None = None
    workers: int = 2
    device: str = "auto"
    augment: str = "cpu"
    seed: int = 0
    shuffle_buffer: int = 2000
    log_every: int = 10
    subset: str | None = None
    stem: str = "auto"
    transfer_head: str = "fixed"
    monitor_train: str | None = None
    monitor_test: str | None = None
    monitor_every: int = 0
    save_every: int = 0
    nan_policy: str = "stop"
    max_bad: float = 0.001
    verify_shards: str = "first"

    def check_runtime_options(self) -> None:
        """Raises ValueError for a run-time option out of range (see the class docstring)."""
        if self.save_every < 0:
            raise ValueError(f"--save-every must be >= 0, not {self.save_every}")
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"--nan-policy is stop or skip, not {self.nan_policy!r}")
        if not 0.0 <= self.max_bad <= 1.0:
            raise ValueError(f"--max-bad is a fraction in [0, 1], not {self.max_bad}")
        if self.verify_shards not in ("first", "off"):
            raise ValueError(f"--verify-shards is first or off, not {self.verify_shards!r}")

    def identity(self) -> dict:
        """The options that make a run what it is (all but :data:`RUNTIME_OPTIONS`), as a dict: what a
        checkpoint records and a resumed run must match. ``augment`` is left out when ``cpu``, ``lr_schedule``
        when ``constant``, ``handover`` when ``reference`` and ``handover_ramp`` when 0: runs saved before these
        options existed had those values, and resume."""
        identity = {item.name: getattr(self, item.name) for item in fields(self) if item.name not in RUNTIME_OPTIONS}
        old_values = (("augment", "cpu"), ("lr_schedule", "constant"), ("handover", "reference"), ("handover_ramp", 0))
        for name, old_value in old_values:
            if identity[name] == old_value:
                del identity[name]
        return identity

    def resolved(self, dataset: ConvertedDataset) -> TrainConfig:
        """This config with the defaults that come from the dataset (data ratio, input size, storage,
        subset strategy) and from the method (lr, weight decay, momentum) filled in, the stem
        resolved, the monitor folders made absolute and, under ``--rela off`` (no hand-over), the hand-over
        options set to ``reference`` and 0: what a run records and resumes by.

        Raises:
            rela_convert.registry.RegistryError: unknown method.
            ValueError: the method needs labels and the dataset has no class folders; an unknown ``lr_schedule`` or
                ``handover``; a negative ``handover_ramp``.
        """
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule is one of {', '.join(LR_SCHEDULES)}, not {self.lr_schedule!r}")
        if self.handover not in HANDOVERS:
            raise ValueError(f"--handover is one of {', '.join(HANDOVERS)}, not {self.handover!r}")
        if self.handover_ramp < 0:
            raise ValueError(f"--handover-ramp must be >= 0 steps, not {self.handover_ramp}")
        method = METHODS.get(self.method)
        if method.needs_labels and not dataset.index.classes:
            raise ValueError(
                f"--method {self.method} trains on class labels, but {dataset.root} was converted from a tree "
                "without class folders"
            )
        input_size = self.input_size or dataset.train_size
        handover = (self.handover, self.handover_ramp) if self.rela != "off" else ("reference", 0)  # no hand-over
        monitor_train, monitor_test = (
            folder and os.path.abspath(folder) for folder in (self.monitor_train, self.monitor_test)
        )
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
            handover=handover[0],
            handover_ramp=handover[1],
            monitor_train=monitor_train,
            monitor_test=monitor_test,
        )


class ReLAModel(nn.Module):
    """A training method plus the ReLA transfer head; ``forward`` returns the step's losses.

    Args:
        method: a :class:`rela_train.methods.Method` (has ``backbone``, ``loss`` and ``head_loss``).
        feature_dim: D_target of the backbone.
        target_dim: d = min(D_target, D_prior).
        transfer_head: ``fixed`` (the reference: ``W`` keeps its random initialisation) or ``trained``.
        handover: ``reference`` or ``warm`` (:mod:`rela_train.handover`: during ReLA the method's heads are also
            fitted on the backbone's detached features).
    """

    def __init__(
        self,
        method: nn.Module,
        feature_dim: int,
        target_dim: int,
        transfer_head: str = "fixed",
        handover: str = "reference",
    ) -> None:
        super().__init__()
        self.method = method
        self.transfer = TransferHead(feature_dim, target_dim, transfer_head)
        self.warm_heads = handover == "warm"

    def forward(
        self, view_1: torch.Tensor, view_2: torch.Tensor, targets: torch.Tensor | None, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(loss to optimise, ReLA loss)``, scalars. With ``targets`` (float ``[B, d]``): the ReLA loss of the two
        views, plus with warm heads the method's :meth:`~rela_train.methods.Method.head_loss` on the backbone's
        detached features (no gradient reaches the backbone from it). Without (None): the method's own loss
        (``labels`` int64 ``[B]``, -1: none), and None."""
        if targets is None:
            return self.method.loss(view_1, view_2, labels), None
        backbone = self.method.backbone
        feature_1, feature_2 = backbone(view_1), backbone(view_2)
        loss = rela_loss(self.transfer(feature_1), self.transfer(feature_2), targets)
        if not self.warm_heads:
            return loss, loss
        return loss + self.method.head_loss(feature_1.detach(), feature_2.detach(), labels), loss


class Trainer:
    """Holds the networks, optimiser, switch state and data stream of one run.

    Args:
        data: converted dataset folder.
        run: output folder.
        config: :class:`TrainConfig`.
        tensorboard: also log the metrics to TensorBoard (``RUN/tensorboard/``); None: when the
            ``tensorboard`` package is installed.

    Attributes:
        state: the :class:`rela_train.run_state.TrainingState` (model, optimiser, switch, epoch, step, step in
            the epoch, switch step, generator states, counters) that every checkpoint saves.
        saved_step: the step of the last checkpoint in RUN (None: none yet).
        verified: the shards whose SHA-256 this run has checked, ``{name: sha256}``.

    Raises:
        DatasetError: ``data`` is not a converted dataset.
        TrainingError: ``run`` holds a run with other options, or ``tensorboard`` is True without the
            ``tensorboard`` package.
        ValueError: an unknown arch, stem, method, transfer head, storage or ``--rela``
            spelling, a subset smaller than one step, only one of the two monitor folders, a
            method that needs labels on a dataset without class folders, or a run-time option out of
            range (:meth:`TrainConfig.check_runtime_options`).
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
        config.check_runtime_options()
        self.config = config = config.resolved(self.dataset)
        device = resolve_device(config.device)
        self.ranks = Ranks.from_environment("nccl" if device.type == "cuda" else "gloo")
        self.device = (
            torch.device("cuda", self.ranks.local_rank) if device.type == "cuda" and self.ranks.distributed else device
        )
        if self.device.type == "cuda" and self.ranks.distributed:
            torch.cuda.set_device(self.device)  # collectives of Python objects use the current device
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
            verify_shards=config.verify_shards,
            augment=config.augment,
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
        self.model = ReLAModel(method, self.feature_dim, target_dim, config.transfer_head, config.handover)
        if self.ranks.distributed and self.device.type == "cuda":  # the reference trains with synchronised batch norm;
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # PyTorch syncs it on GPUs only
        self.model = self.model.to(self.device)
        self.pca_mean, self.pca_weight = (t.to(self.device) for t in self.dataset.pca.projection(self.feature_dim))
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
        )
        self.state = TrainingState(
            config=config.identity(),
            data=str(self.dataset.root.resolve()),
            dataset=self.dataset.index.identity(),
            world_size=self.ranks.world,
            feature_dim=self.feature_dim,
            model=self.model,
            optimizer=self.optimizer,
            guard=None,
        )
        if self.mode == "guarded" and not config.monitor_every and self.is_main:
            LOGGER.warning(
                "--rela guarded hands over to the method only on the online kNN monitor's evidence; without "
                "--monitor-train, --monitor-test and --monitor-every there is none, so ReLA trains to the end"
            )
        self.metrics: MetricsLog | None = None  # rank 0, while fit runs
        self.saved_step: int | None = None  # the step of the last checkpoint in RUN (None: none)
        self._started, self._seconds_before = time.perf_counter(), 0.0  # this call's start; training seconds before
        self.verified: dict[str, str] = {}  # shards checked by this run: name -> sha256
        self._verified_written: dict[str, str] = {}
        self._stop: _StopSignals | None = None
        self.monitor = None
        if config.monitor_train and config.monitor_every and self.is_main:
            self.monitor = KNNMonitor(config.monitor_train, config.monitor_test, config.input_size)
        if self.mode == "guarded":  # the monitor's standard error at 50% accuracy: what a trial's verdict tolerates
            test_images = len(self.monitor.test_labels) if self.monitor is not None else 0
            tolerance = 0.5 / math.sqrt(test_images) if test_images else 0.0
            self.state.guard = GuardedSwitch(interval=config.monitor_every, tolerance=tolerance)
        self.device_views = (  # --augment device: both views of every batch made here, on the training device
            DeviceViews((rela_params(config.input_size),) * 2, method_class.view_params(config.input_size), self.device)
            if config.augment == "device"
            else None
        )
        self.forward = self.model
        if self.ranks.distributed:
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
        if self.mode == "guarded":
            return self.state.guard.rela_active
        return not self.state.switch.switched

    def _note_switch(self, was_rela: bool) -> bool:
        """Record the step at which ReLA ended (or, when a guarded trial is rolled back, that it has not) and give
        the stream the views of the phase that follows; returns whether the phase changed at this step."""
        rela = self.rela_active()
        if was_rela == rela:
            return False
        self.state.switch_step = None if rela else self.state.step
        self.stream.set_phase(rela=rela)
        return True

    def _guard(self, accuracy: float | None, last: bool = False) -> None:
        """``--rela guarded[:<c>]``: rank 0 decides on the monitor's reading ``accuracy`` (:meth:`GuardedSwitch.decide`;
        a hand-over is proposed once the plateau rule has fired or, with ``:<c>``, from epoch ``int(c * epochs)`` on),
        every rank applies the decision: at a trial's start the model and optimiser are copied, at its rejection
        they are restored from that copy. ``last``: the run ends after this step."""
        guard, state = self.state.guard, self.state
        actions = (None, "start", "keep", "rollback")
        code = 0.0
        if self.is_main and accuracy is not None:
            due = state.epoch >= static_rela_epochs(self.static_fraction, self.config.epochs)  # --rela guarded:<c>
            proposed = state.switch.switched or due
            code = float(actions.index(guard.decide(state.step, accuracy, proposed, last)))
        if self.ranks.world > 1:
            (code,) = self.ranks.reduce([code])
        action = actions[int(code)]
        guard.apply(action, state.step)
        if action == "start":
            state.trial_snapshot = {
                "model": _cpu_copy(self.model.state_dict()),
                "optimizer": _cpu_copy(self.optimizer.state_dict()),
            }
        elif action == "rollback":
            self.model.load_state_dict(state.trial_snapshot["model"])
            self.optimizer.load_state_dict(state.trial_snapshot["optimizer"])
        if action in ("keep", "rollback"):
            state.trial_snapshot = None
        if action is not None and self.metrics is not None:
            trial = guard.trials[-1] if action != "start" else {}
            self.metrics.write(
                {
                    "epoch": state.epoch,
                    "step": state.step,
                    "images_seen": self.images_seen,
                    "handover": action,
                    **{f"trial_{key}": value for key, value in trial.items()},
                }
            )

    @property
    def finished(self) -> bool:
        """Whether RUN holds this run finished (all epochs trained and summary.json written)."""
        return run_finished(self.run, self.state.epoch, self.config.epochs)

    @property
    def images_seen(self) -> int:
        """Training images consumed so far over all ranks (steps x batch x world)."""
        return self.state.step * self.config.batch_size * self.ranks.world

    def _resume(self) -> bool:
        """Restore RUN's checkpoint when it has one (only the counters when the run is finished), with this
        rank's random generators; returns whether it had one."""
        try:
            saved = self.state.load(self.run, map_location=self.device)
        except CheckpointError as error:
            raise TrainingError(str(error)) from None
        if saved is None:
            return False
        self.state.restore_progress(saved)
        self.saved_step = self.state.step
        if not self.finished:  # a finished run needs no training state
            self.state.restore_training(saved)
            if self.state.rng is not None and len(self.state.rng) > self.ranks.rank:
                set_rng_state(self.state.rng[self.ranks.rank], self.device)
        return True

    def _load_verified(self) -> None:
        """Read RUN/verified_shards.json: the shards this run already checked whose hash the index still records."""
        try:
            recorded = json.loads((self.run / VERIFIED_NAME).read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = {}
        current = {shard["name"]: shard["sha256"] for shard in self.dataset.shards}
        if not isinstance(recorded, dict):
            recorded = {}
        self.verified = {name: digest for name, digest in recorded.items() if current.get(name) == digest}
        self._verified_written = dict(self.verified)

    def _save(self) -> None:
        """Save the checkpoint with every rank's generator states (rank 0 writes it) and the shards checked so
        far (RUN/verified_shards.json); every rank calls it at the same step."""
        states, verified = [rng_state(self.device)], dict(self.verified)
        if self.ranks.world > 1:
            gathered: list = [None] * self.ranks.world
            dist.all_gather_object(gathered, (states[0], verified))
            states = [state for state, _ in gathered]
            for _, shards in gathered:
                verified.update(shards)
            self.verified = verified
        if self.is_main:
            self.state.rng = states
            self.state.seconds = self._seconds_before + time.perf_counter() - self._started
            self.state.save(self.run)
            if verified != self._verified_written:
                write_json_atomic(self.run / VERIFIED_NAME, {"shards": verified})
                self._verified_written = dict(verified)
        self.saved_step = self.state.step

    def _truncate_log(self, name: str, step: int) -> None:
        """Rank 0: keep the lines of RUN/<name> (JSON lines with a ``step``) up to ``step``."""
        path = self.run / name
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
            write_atomic(path, "".join(kept).encode())

    def _write_skipped(self, records: list[dict]) -> None:
        """Append this rank's unusable samples to RUN/skipped.jsonl (one write: ranks do not interleave lines)."""
        if not records:
            return
        data = "".join(json.dumps(record) + "\n" for record in records).encode()
        handle = os.open(self.run / SKIPPED_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(handle, data)
        finally:
            os.close(handle)

    def _monitor(self) -> float | None:
        """Rank 0: log the online kNN accuracy of the backbone now (``{"epoch", "step", "images_seen",
        "monitor_knn_top1", "seconds"}``) and return it; other ranks wait and return None."""
        accuracy = None
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
        return accuracy

    def _log_step(
        self, rela: bool, loss: float, rela_loss_value: float | None, rho: float | None, images_per_s: float
    ) -> dict:
        """Rank 0: log the step just taken; returns the record (``loss`` None for a skipped step; ``rela_loss`` None
        outside ReLA, and below ``loss`` by the warm heads' loss with ``--handover warm``)."""
        finite = math.isfinite(loss)
        record = {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "images_seen": self.images_seen,
            "phase": "rela" if rela else "ssl",
            "loss": loss if finite else None,
            "rela_loss": rela_loss_value if rela and finite else None,
            "rho": rho,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": images_per_s,
            "skipped_steps": self.state.skipped_steps,
            "bad_samples": self.state.bad_samples,
        }
        self.metrics.write(record)
        return record

    def _mean_over_ranks(self, *values: torch.Tensor) -> list[float]:
        """The scalars ``values``, each averaged over ranks (one all-reduce)."""
        stacked = torch.stack([value.detach().float() for value in values])
        if self.ranks.world > 1:
            dist.all_reduce(stacked)
            stacked /= self.ranks.world
        return stacked.tolist()

    def train_step(
        self, view_1: torch.Tensor, view_2: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, rela: bool
    ) -> tuple[float, float | None]:
        """One optimiser step on a batch, then the method's bookkeeping; returns ``(loss, ReLA loss)``, averaged
        over ranks (the ReLA loss: None outside ReLA; the loss adds the warm heads' loss to it, ``--handover warm``).

        Args:
            view_1, view_2: float32 ``[B, 3, S, S]``; features: float32 ``[B, D_prior]``; labels: int64 ``[B]``.
            rela: optimise the ReLA loss (else the method's).

        A non-finite loss (NaN or infinite on any rank) makes no update and no bookkeeping; the caller
        applies ``--nan-policy``.
        """
        view_1 = view_1.to(self.device, non_blocking=True)
        view_2 = view_2.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        targets = (features.to(self.device, non_blocking=True) - self.pca_mean) @ self.pca_weight if rela else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss, rela_part = self.forward(view_1, view_2, targets, labels)
        value, rela_value = self._mean_over_ranks(loss, loss if rela_part is None else rela_part)
        rela_value = rela_value if rela else None
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(value):
            if self.forward is not self.model:  # DistributedDataParallel expects a backward after each forward
                loss.backward()
            return value, rela_value
        loss.backward()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.state.step)
        self.optimizer.step()
        self.model.method.after_step(self.state.step)
        return value, rela_value

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): ``--lr``, or with ``--lr-schedule cosine``
        ``lr * 0.5 * (1 + cos(pi * step / total_steps))``, total steps ``steps_per_epoch * epochs``, times the
        hand-over ramp (``--handover-ramp``, :func:`rela_train.handover.handover_lr_factor`). A function of the
        step and the switch step alone, so a resumed run continues the same schedule. Our additions: the
        reference trains at a constant learning rate (the default here) and has no ramp."""
        ramp = handover_lr_factor(step, self.state.switch_step, self.config.handover_ramp)
        if self.config.lr_schedule == "constant":
            return self.config.lr * ramp
        total = self.steps_per_epoch * self.config.epochs
        return self.config.lr * ramp * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    def _checkpoint_note(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is {self.run / CHECKPOINT_NAME} (step {self.saved_step})"

    def _non_finite(self, loss: float, rela: bool) -> None:
        """Apply ``--nan-policy`` to a step whose loss is not finite (no update was made).

        Raises:
            TrainingError: policy ``stop``, or more than :data:`MAX_CONSECUTIVE_SKIPS` such steps in a row.
        """
        state, step, phase = self.state, self.state.step + 1, "rela" if rela else "ssl"
        where = f"step {step} (epoch {state.epoch + 1}, phase {phase})"
        if self.config.nan_policy == "stop":
            raise TrainingError(
                f"{where}: the loss is {loss} (--nan-policy stop); {self._checkpoint_note()}: resume from it with "
                "--nan-policy skip, or train again with a lower --lr"
            )
        state.skipped_steps += 1
        state.consecutive_skips += 1
        if state.consecutive_skips > MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(
                f"{where}: {state.consecutive_skips} steps in a row had a non-finite loss (--nan-policy skip stops "
                f"after {MAX_CONSECUTIVE_SKIPS}); {self._checkpoint_note()}: train again with a lower --lr"
            )

    def _take_report(self, report: dict) -> list[dict]:
        """A batch's report: raises its stream error; keeps the shards checked; returns its unusable samples as
        skipped.jsonl records."""
        if report["error"]:
            raise TrainingError(report["error"])
        self.verified.update(report["verified"])
        state = self.state
        return [{"step": state.step + 1, "epoch": state.epoch, "rank": self.ranks.rank, **bad} for bad in report["bad"]]

    def _check_bad(self, records: list[dict]) -> None:
        """Stop when more than ``--max-bad`` of the samples read (counted over at least one epoch) were unusable.

        Raises:
            TrainingError: too many; the message names the last one this rank saw.
        """
        config, state = self.config, self.state
        per_step = config.batch_size * self.ranks.world
        seen = state.step * per_step
        if state.bad_samples <= config.max_bad * max(seen, self.steps_per_epoch * per_step):
            return
        last = (
            f" (the last: key {records[-1]['key']} in {records[-1]['shard']}: {records[-1]['reason']})"
            if records
            else ""
        )
        raise TrainingError(
            f"step {state.step}: {state.bad_samples} of the {seen} samples read could not be used{last}, more than "
            f"--max-bad {config.max_bad} allows; {self.run / SKIPPED_NAME} lists them: check the dataset with rela "
            f"inspect {self.dataset.root} --verify"
        )

    def _step_flags(self, bad: int) -> tuple[int, bool]:
        """``(unusable samples of this step over all ranks, whether any rank was asked to stop)``."""
        asked = self._stop is not None and self._stop.received is not None
        if self.ranks.world == 1:
            return bad, asked
        total, stop = self.ranks.reduce([float(bad), float(asked)])
        return int(total), stop > 0

    def _interrupted(self) -> TrainingInterrupted:
        signum = (self._stop.received if self._stop else None) or signal.SIGTERM
        return TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after step {self.state.step} of "
            f"{self.steps_per_epoch * self.config.epochs}; saved {self.run / CHECKPOINT_NAME}: run the same command "
            "again to resume",
            signum,
        )

    def _views(self, batch: Batch, rela: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's two views (float32 ``[B, 3, S, S]``): as the workers made them, or with ``--augment device``
        made here from its decoded pictures on the training device, with ``rela``'s parameters drawn from a
        generator seeded by (seed, epoch, step in the epoch, rank) (:func:`rela_train.device_views.step_seed`)."""
        if self.device_views is None:
            return batch.view_1, batch.view_2
        seed = step_seed(self.config.seed, self.state.epoch, self.state.epoch_step, self.ranks.rank)
        return self.device_views(batch.view_1, batch.view_2, rela, seed)

    def _start_stream(self, loader, rela: bool):
        """An iterator over the current epoch's batches from the current step on, with ``rela``'s views."""
        self.stream.set_epoch(self.state.epoch, self.state.epoch_step)
        self.stream.set_phase(rela)
        self.stream.verified = set(self.verified)
        return iter(loader)

    def _train_epoch(self, loader, progress: bool) -> int:
        """Train the current epoch from its current step, save at its end; returns the images trained on."""
        state, config = self.state, self.config
        rela = self.rela_active()
        batches = self._start_stream(loader, rela)
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=state.epoch_step,
            desc=f"epoch {state.epoch + 1}/{config.epochs}",
            unit="step",
            disable=not (progress and self.is_main),
        )
        window_start, window_images, images, stop = time.perf_counter(), 0, 0, False  # throughput since the last log
        try:
            while state.epoch_step < self.steps_per_epoch:
                try:
                    batch: Batch = next(batches)
                except StopIteration:
                    raise TrainingError(
                        f"the data of epoch {state.epoch + 1} ended after {state.epoch_step} of {self.steps_per_epoch} "
                        f"steps: check the dataset with rela inspect {self.dataset.root} --verify"
                    ) from None
                rela = self.rela_active()
                skipped = self._take_report(batch.report)
                view_1, view_2 = self._views(batch, rela)
                loss, rela_loss_value = self.train_step(view_1, view_2, batch.features, batch.labels, rela)
                if math.isfinite(loss):
                    state.consecutive_skips = 0
                else:
                    self._non_finite(loss, rela)
                plateau_rule = self.mode in ("adaptive", "guarded")
                rho = state.switch.update(rela_loss_value) if rela and plateau_rule and math.isfinite(loss) else None
                state.step += 1
                state.epoch_step += 1
                bad, stop = self._step_flags(len(skipped))
                state.bad_samples += bad
                self._write_skipped(skipped)
                self._check_bad(skipped)
                batch_images = len(batch.labels) * self.ranks.world
                window_images += batch_images
                images += batch_images
                bar.update(1)
                if self.metrics is not None and state.step % config.log_every == 0:
                    rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                    record = self._log_step(rela, loss, rela_loss_value, rho, rate)
                    bar.set_postfix(phase=record["phase"], loss=f"{loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
                    window_start, window_images = time.perf_counter(), 0
                last = state.epoch_step == self.steps_per_epoch and state.epoch + 1 == config.epochs
                if config.monitor_every and (state.step % config.monitor_every == 0 or last):
                    accuracy = self._monitor()
                    if state.guard is not None:
                        self._guard(accuracy, last)
                    window_start = time.perf_counter()
                if self._note_switch(rela) and state.epoch_step < self.steps_per_epoch and self.device_views is None:
                    batches = (
                        None  # batches made ahead hold the other phase's views: the new phase's from the next step
                    )
                    batches = self._start_stream(loader, self.rela_active())
                if state.epoch_step < self.steps_per_epoch:  # the epoch's end saves anyway
                    if stop or (config.save_every and state.step % config.save_every == 0):
                        self._save()
                    if stop:
                        raise self._interrupted()
        finally:
            bar.close()
            batches = None  # ends the workers
        state.epoch += 1
        state.epoch_step = 0
        if state.epoch < config.epochs:  # ReLA that lasts to the end never switched
            self._note_switch(self.rela_active() if self.mode == "guarded" else rela)
        self._save()
        self.ranks.barrier()
        if stop and state.epoch < config.epochs:
            raise self._interrupted()
        return images

    def fit(self, progress: bool = True) -> dict:
        """Train for the configured epochs (resuming from ``RUN/checkpoint.pt`` if present, at its step).

        Returns:
            The summary written to ``RUN/summary.json``: ``epochs``, ``steps``,
            ``switch_step`` (None if ReLA never ended), ``images_seen``, ``images_per_s`` (training
            throughput of this call over all ranks), ``seconds`` (training time over every call that trained
            the run: a resumed run adds this call's time to the checkpoint's), ``world_size``, ``bad_samples``
            (samples replaced in their batch), ``skipped_steps`` (non-finite losses skipped); when RUN
            already holds the finished run, its stored summary with ``already_done: True``.

        Raises:
            TrainingError: RUN holds another run or an unreadable checkpoint; a non-finite loss
                (``--nan-policy``); too many unusable samples (``--max-bad``); a shard that fails its
                hash check or cannot be read. :class:`TrainingInterrupted`: SIGTERM / SIGINT (saved first).
                Every message is one line.
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
            if self.monitor is not None and self.monitor.skipped:
                write_jsonl_atomic(self.run / MONITOR_SKIPPED_NAME, self.monitor.skipped)
        self._load_verified()
        self._stop = _StopSignals()
        try:
            with self._stop:
                if self.is_main:  # records of steps after the checkpoint (all of them without one) go
                    self.metrics.truncate_after(state.step if resumed else -1)
                    self._truncate_log(SKIPPED_NAME, state.step if resumed else -1)
                self.ranks.barrier()
                loader = self.stream.loader(config.workers, pin_memory=self.device.type == "cuda", reports=True)
                self._started, self._seconds_before, images = time.perf_counter(), state.seconds, 0
                self.model.train()
                if state.step == 0:
                    accuracy = self._monitor()
                    if state.guard is not None:
                        self._guard(accuracy)
                while state.epoch < config.epochs:
                    images += self._train_epoch(loader, progress)
        finally:
            self._stop = None
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
        seconds = time.perf_counter() - self._started
        summary = {
            "epochs": state.epoch,
            "steps": state.step,
            "switch_step": state.switch_step,
            "images_seen": self.images_seen,
            "images_per_s": images / max(seconds, 1e-9),
            "seconds": self._seconds_before + seconds,
            "world_size": self.ranks.world,
            "bad_samples": state.bad_samples,
            "skipped_steps": state.skipped_steps,
            **({"trials": state.guard.trials} if state.guard is not None else {}),
        }
        if self.is_main:
            write_json_atomic(self.run / "summary.json", summary)
        self.ranks.close()
        return summary


def _cpu_copy(value):
    """A copy of a (nested) state dict with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return value


class _StopSignals:
    """While active (a context manager; handlers are installed from the main thread only), SIGTERM and SIGINT
    set :attr:`received` (the signal's number) for the training loop, which stops after its step; a second
    signal raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
