"""``rela train``: self-supervised training accelerated by the ReLA loss (ReLA-F): the training loop.

:class:`Trainer` runs the epochs and steps of one run. What it stands on, one module each: the options
(:mod:`rela_train.config`), what is built before the first step (:mod:`rela_train.setup`), which loss each step
optimises (:mod:`rela_train.phases`: ReLA's, then the method's, method.md stage 2), what RUN keeps and a resumed run
restores (:mod:`rela_train.run_state`) and how a run stops (:mod:`rela_train.stopping`). Our additions
(:mod:`rela_train.handover`, deliberate deviations from the reference): the default
``--rela guarded`` only tries the method when the plateau rule proposes it and keeps
it on the online kNN monitor's evidence (a rejected trial is rolled back), and the
default ``--handover warm`` fits the method's heads on detached features during
ReLA. ``--rela off`` runs the same code with ReLA never active, so comparisons are
fair: same initialisation, same data order, same optimiser.

Under ``torchrun`` (or ``--nproc``) every process trains a replica wrapped in
``DistributedDataParallel`` on its own share of each epoch (see
:mod:`rela_train.data.plan`); all ranks run the same number of steps, and the ReLA
loss fed to the switch is the mean over ranks, so every rank switches at the
same step.

Outputs in RUN (written by rank 0): ``config.json``, ``metrics.jsonl`` (one JSON
line per logged step, plus one per online kNN evaluation with ``--monitor-*``; the
same numbers as TensorBoard scalars in ``tensorboard/`` unless TensorBoard is off,
:mod:`rela_train.metrics`), ``summary.json``, ``checkpoint.pt`` (saved atomically
after every epoch and every ``--save-every`` steps, :mod:`rela_convert.checkpoint`),
``verified_shards.json`` (the shards whose SHA-256 the run has checked, ``--verify-shards``)
and ``skipped.jsonl`` (one line per sample that could not be used: ``step``, ``epoch``,
``rank``, ``key``, ``shard``, ``reason``; rank 0 writes every rank's).

Training that survives: a run killed at any step (even with SIGKILL) and started again
with the same command resumes from its last checkpoint and ends with weights
bit-identical to an uninterrupted run's on the CPU (same process count and workers). The
checkpoint holds the model (with the methods' momentum networks and queues), optimiser,
switch, the position in the epoch and every process's random generators; the data are a
function of (seed, epoch, step) (:mod:`rela_train.data.stream`), so the stream restarts at the
checkpoint's step. SIGTERM or SIGINT ends the current step, saves and stops the run
(:class:`rela_train.stopping.TrainingInterrupted`; a second signal stops at once). A non-finite loss stops the
run (``--nan-policy stop``) or skips the step's update (``skip``; more than
:data:`MAX_CONSECUTIVE_SKIPS` in a row stop it). Samples that cannot be used are replaced
within their batch and listed in ``skipped.jsonl``; more than ``--max-bad`` of the samples
read stop the run. Every error that stops a run is one line.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from rela_convert.checkpoint import CHECKPOINT_NAME
from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.files import write_json_atomic, write_jsonl_atomic
from rela_convert.dataset.pca import standardised_targets
from rela_train.config import TrainConfig
from rela_train.data.batch import Batch
from rela_train.device_views import step_seed
from rela_train.handover import handover_lr_factor
from rela_train.metrics import MetricsLog, tensorboard_available
from rela_train.monitor import KNNMonitor
from rela_train.phases import Phases
from rela_train.run_state import SKIPPED_NAME, RunFolder, TrainingState
from rela_train.setup import (
    build_device_views,
    build_model,
    build_optimizer,
    build_stream,
    join_processes,
    replicated,
    resolve_config,
)
from rela_train.stopping import StopSignals, TrainingError, TrainingInterrupted

#: ``--nan-policy skip`` stops the run when more steps than this in a row had a non-finite loss.
MAX_CONSECUTIVE_SKIPS = 10
#: RUN/monitor_skipped.jsonl: one JSON line (``path``, ``reason``) per file the online kNN monitor left out.
MONITOR_SKIPPED_NAME = "monitor_skipped.jsonl"


class Trainer:
    """Holds the networks, optimiser, phases, run folder and data stream of one run, and trains it.

    Args:
        data: converted dataset folder.
        run: output folder.
        config: :class:`rela_train.config.TrainConfig`.
        tensorboard: also log the metrics to TensorBoard (``RUN/tensorboard/``); None: when the
            ``tensorboard`` package is installed.

    Attributes:
        state: the :class:`rela_train.run_state.TrainingState` (model, optimiser, switch, epoch, step, step in
            the epoch, switch step, generator states, counters) that every checkpoint saves.
        folder: the :class:`rela_train.run_state.RunFolder` of RUN (its ``saved_step``: the step of the last
            checkpoint; its ``verified``: the shards whose SHA-256 this run has checked).
        phases: the :class:`rela_train.phases.Phases` of ``--rela``.

    Raises:
        DatasetError: ``data`` is not a converted dataset.
        TrainingError: ``run`` holds a run with other options, or ``tensorboard`` is True without the
            ``tensorboard`` package.
        ValueError: an option out of its declared range or choices (:meth:`TrainConfig.check`), an unknown arch or
            ``--rela`` spelling, a subset smaller than one step, only one of the two monitor folders, or a method
            that needs labels on a dataset without class folders.
    """

    def __init__(self, data: str | Path, run: str | Path, config: TrainConfig, tensorboard: bool | None = None) -> None:
        if tensorboard and not tensorboard_available():
            raise TrainingError("--tensorboard needs the tensorboard package: pip install tensorboard")
        self.tensorboard = tensorboard_available() if tensorboard is None else tensorboard
        config.check()
        if (config.monitor_train is None) != (config.monitor_test is None):
            raise ValueError("give both --monitor-train and --monitor-test, or neither")
        self.phases = Phases(config.rela, config.epochs)
        self.dataset = ConvertedDataset(data, config.storage)
        self.run = Path(run)
        self.config = config = resolve_config(config, self.dataset)
        self.ranks, self.device = join_processes(config.device)
        self.stream = build_stream(self.dataset, config, self.ranks)
        self.steps_per_epoch = self.stream.plan().steps
        self.model, self.feature_dim = build_model(config, self.dataset, self.steps_per_epoch, self.ranks, self.device)
        self.pca_mean, self.pca_weight = (t.to(self.device) for t in self.dataset.pca.projection(self.feature_dim))
        self.optimizer = build_optimizer(self.model, config)
        self.forward = replicated(self.model, self.ranks, self.device)
        self.device_views = build_device_views(config, self.device)
        self.monitor = None
        if config.monitor_train and config.monitor_every and self.is_main:
            self.monitor = KNNMonitor(config.monitor_train, config.monitor_test, config.input_size)
        self.state = TrainingState(
            config=config.identity(),
            data=str(self.dataset.root.resolve()),
            dataset=self.dataset.index.identity(),
            world_size=self.ranks.world,
            feature_dim=self.feature_dim,
            model=self.model,
            optimizer=self.optimizer,
            guard=self.phases.guarded_switch(
                config.monitor_every, len(self.monitor.test_labels) if self.monitor else 0, self.is_main
            ),
        )
        self.folder = RunFolder(self.run, self.state, self.ranks, self.device)
        self.metrics: MetricsLog | None = None  # rank 0, while fit runs
        self._started, self._seconds_before = time.perf_counter(), 0.0  # this call's start; training seconds before
        self._stop: StopSignals | None = None

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

    @property
    def images_seen(self) -> int:
        """Training images consumed so far over all ranks (steps x batch x world)."""
        return self.state.step * self.config.batch_size * self.ranks.world

    def _guard(self, accuracy: float | None, last: bool = False) -> None:
        """Apply ``--rela guarded`` to the monitor's reading ``accuracy`` (:meth:`rela_train.phases.Phases.guard`)
        and log the action taken. ``last``: the run ends after this step."""
        state = self.state
        action = self.phases.guard(state, accuracy, self.ranks, last)
        if action is not None and self.metrics is not None:
            trial = state.guard.trials[-1] if action != "start" else {}
            self.metrics.write(
                {
                    "epoch": state.epoch,
                    "step": state.step,
                    "images_seen": self.images_seen,
                    "handover": action,
                    **{f"trial_{key}": value for key, value in trial.items()},
                }
            )

    def _save(self) -> None:
        """Save the checkpoint (with this call's training time) and the shards checked so far; every rank calls it
        at the same step (:meth:`rela_train.run_state.RunFolder.save`)."""
        self.state.seconds = self._seconds_before + time.perf_counter() - self._started
        self.folder.save()

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
        features = features.to(self.device, non_blocking=True)
        targets = standardised_targets(features, self.pca_mean, self.pca_weight) if rela else None
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

    def _non_finite(self, loss: float, rela: bool) -> None:
        """Apply ``--nan-policy`` to a step whose loss is not finite (no update was made).

        Raises:
            TrainingError: policy ``stop``, or more than :data:`MAX_CONSECUTIVE_SKIPS` such steps in a row.
        """
        state, step, phase = self.state, self.state.step + 1, "rela" if rela else "ssl"
        where = f"step {step} (epoch {state.epoch + 1}, phase {phase})"
        if self.config.nan_policy == "stop":
            raise TrainingError(
                f"{where}: the loss is {loss} (--nan-policy stop); {self.folder.checkpoint_note()}: resume from it "
                "with --nan-policy skip, or train again with a lower --lr"
            )
        state.skipped_steps += 1
        state.consecutive_skips += 1
        if state.consecutive_skips > MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(
                f"{where}: {state.consecutive_skips} steps in a row had a non-finite loss (--nan-policy skip stops "
                f"after {MAX_CONSECUTIVE_SKIPS}); {self.folder.checkpoint_note()}: train again with a lower --lr"
            )

    def _take_report(self, report: dict) -> list[dict]:
        """A batch's report: raises its stream error; keeps the shards checked; returns its unusable samples as
        skipped.jsonl records."""
        if report["error"]:
            raise TrainingError(report["error"])
        self.folder.verified.update(report["verified"])
        state = self.state
        return [{"step": state.step + 1, "epoch": state.epoch, "rank": self.ranks.rank, **bad} for bad in report["bad"]]

    def _check_bad(self, records: list[dict]) -> None:
        """Stop when more than ``--max-bad`` of the samples read (counted over at least one epoch) were unusable.

        Raises:
            TrainingError: too many; the message names the last one of this step (any rank's), if any.
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
        self.stream.reader.verified = set(self.folder.verified)
        return iter(loader)

    def _train_epoch(self, loader, progress: bool) -> int:
        """Train the current epoch from its current step, save at its end; returns the images trained on."""
        state, config = self.state, self.config
        rela = self.phases.rela_active(state)
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
                rela = self.phases.rela_active(state)
                skipped = self._take_report(batch.report)
                view_1, view_2 = self._views(batch, rela)
                loss, rela_loss_value = self.train_step(view_1, view_2, batch.features, batch.labels, rela)
                if math.isfinite(loss):
                    state.consecutive_skips = 0
                else:
                    self._non_finite(loss, rela)
                plateau = rela and self.phases.plateau_rule and math.isfinite(loss)
                if plateau:
                    state.switch.update(rela_loss_value)
                rho = state.switch.rho if plateau else None
                state.step += 1
                state.epoch_step += 1
                bad, stop = self._step_flags(len(skipped))
                state.bad_samples += bad
                skipped = self.folder.write_skipped(skipped, bad)  # every rank's, from now on
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
                switched = self.phases.note_switch(state, rela, self.stream)
                if switched and state.epoch_step < self.steps_per_epoch and self.device_views is None:
                    batches = (
                        None  # batches made ahead hold the other phase's views: the new phase's from the next step
                    )
                    batches = self._start_stream(loader, self.phases.rela_active(state))
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
            was_rela = self.phases.rela_active(state) if self.phases.mode == "guarded" else rela
            self.phases.note_switch(state, was_rela, self.stream)
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
                hash check or cannot be read. :class:`~rela_train.stopping.TrainingInterrupted`: SIGTERM / SIGINT
                (saved first). Every message is one line.
        """
        self.run.mkdir(parents=True, exist_ok=True)
        resumed = self.folder.resume(self.config.epochs)
        if self.folder.finished(self.config.epochs):
            return {**json.loads((self.run / "summary.json").read_text()), "already_done": True}
        state, config = self.state, self.config
        if self.is_main:
            write_json_atomic(
                self.run / "config.json", {**state.config, "data": state.data, "world_size": state.world_size}
            )
            self.metrics = MetricsLog(self.run, self.tensorboard)
            if self.monitor is not None and self.monitor.skipped:
                write_jsonl_atomic(self.run / MONITOR_SKIPPED_NAME, self.monitor.skipped)
        self.folder.load_verified(self.dataset.shards)
        self._stop = StopSignals()
        try:
            with self._stop:
                if self.is_main:  # records of steps after the checkpoint (all of them without one) go
                    self.metrics.truncate_after(state.step if resumed else -1)
                    self.folder.truncate_log(SKIPPED_NAME, state.step if resumed else -1)
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
