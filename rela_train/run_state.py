"""One run's state: what ``RUN/checkpoint.pt`` saves and a resumed run restores, and the other files RUN keeps.

:class:`TrainingState` holds the model, optimiser, switch and counters of a run and turns them into the checkpoint
dict of :mod:`rela_convert.checkpoint` (the file format, which ``rela eval`` and ``run:`` priors read too) and back;
:func:`rng_state` / :func:`set_rng_state` carry every process's random generators across a resume, so that a
resumed run ends with the weights of an uninterrupted one. :class:`RunFolder` saves and resumes it in RUN, with
``verified_shards.json`` (:data:`VERIFIED_NAME`) and ``skipped.jsonl`` (:data:`SKIPPED_NAME`).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rela_convert.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, run_finished, save_checkpoint
from rela_convert.dataset.files import write_atomic, write_json_atomic
from rela_convert.dataset.index import ShardRecord
from rela_convert.distributed import Ranks
from rela_train.handover import GuardedSwitch
from rela_train.rela import AdaptiveSwitch
from rela_train.stopping import TrainingError

#: RUN/verified_shards.json: ``{"shards": {name: sha256}}``, the shards whose hash the run has checked.
VERIFIED_NAME = "verified_shards.json"
#: RUN/skipped.jsonl: one JSON line per sample that could not be used.
SKIPPED_NAME = "skipped.jsonl"


def rng_state(device: torch.device | None = None) -> dict:
    """The states of the global random generators of this process: torch's CPU generator, the CUDA
    generator of ``device`` (when it is a CUDA device), NumPy's global generator and Python's ``random``;
    plain tensors, numbers and tuples, so a checkpoint holding it loads with ``weights_only=True``.

    Returns:
        ``{"torch": uint8 tensor, "cuda": uint8 tensor or None, "numpy": (name, int64 [624], pos,
        has_gauss, cached_gaussian), "python": random.getstate()}``.
    """
    name, keys, position, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": cuda,
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)),
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore the generators saved by :func:`rng_state` (the CUDA one on ``device`` when both are CUDA)."""
    torch.random.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class TrainingState:
    """One run's training objects and progress: what ``rela train`` saves after every epoch (and every
    ``--save-every`` steps) and restores when started again on the same RUN.

    Attributes:
        config: the resolved ``TrainConfig`` as a dict; with ``world_size``, what makes a checkpoint
            this run's (another config or process count is refused).
        data: the converted dataset folder, resolved.
        dataset: the dataset's :meth:`~rela_convert.dataset.index.DatasetIndex.identity`.
        world_size: training processes.
        feature_dim: D_target of the backbone.
        model: the trained module; ``model.method.backbone`` is the backbone.
        optimizer: its optimiser.
        switch: the adaptive switch's running losses.
        epoch: epochs finished.
        step: steps taken (each over all processes; a step skipped for a non-finite loss counts).
        epoch_step: steps taken in the unfinished epoch (0 at an epoch's end).
        switch_step: the step at which ReLA ended; None while it has not.
        seconds: training time up to this checkpoint, seconds, summed over every call that trained the run (a
            resumed run goes on counting from here; time between a stop and its resumption is not counted).
        rng: :func:`rng_state` of every training process (index: rank), set by the trainer before saving;
            None: not known (the generators are left as they are on restore).
        bad_samples: samples that could not be used so far (over all processes).
        skipped_steps: steps skipped for a non-finite loss so far; consecutive_skips: how many of them
            in a row up to now.
        guard: the guarded rule's state (``--rela guarded``; None under the other rules).
        trial_snapshot: while a trial of the method runs (``--rela guarded``), ``{"model", "optimizer"}``: their
            state dicts (on the CPU) from the trial's start, restored if the trial is rejected; else None.
    """

    config: dict
    data: str
    dataset: dict
    world_size: int
    feature_dim: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    switch: AdaptiveSwitch = field(default_factory=AdaptiveSwitch)
    epoch: int = 0
    step: int = 0
    epoch_step: int = 0
    switch_step: int | None = None
    seconds: float = 0.0
    rng: list[dict] | None = None
    bad_samples: int = 0
    skipped_steps: int = 0
    consecutive_skips: int = 0
    guard: GuardedSwitch | None = None
    trial_snapshot: dict | None = None

    def checkpoint(self) -> dict:
        """The checkpoint dict (without ``format``, which :func:`save_checkpoint` adds)."""
        return {
            "arch": self.config["arch"],
            "input_size": self.config["input_size"],
            "stem": self.config["stem"],
            "feature_dim": self.feature_dim,
            "backbone": self.model.method.backbone.state_dict(),
            "config": self.config,
            "data": self.data,
            "dataset": self.dataset,
            "world_size": self.world_size,
            "epoch": self.epoch,
            "step": self.step,
            "epoch_step": self.epoch_step,
            "switch_step": self.switch_step,
            "seconds": self.seconds,
            "training": {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "switch": self.switch.state_dict(),
                "rng": self.rng,
                "bad_samples": self.bad_samples,
                "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips,
                **({"guard": asdict(self.guard), "trial_snapshot": self.trial_snapshot} if self.guard else {}),
            },
        }

    def save(self, run: str | Path) -> None:
        """Write ``RUN/checkpoint.pt`` atomically: the previous checkpoint stays in place until the new one
        is complete on disk.

        Raises:
            OSError: the file cannot be written.
        """
        save_checkpoint(self.checkpoint(), Path(run) / CHECKPOINT_NAME)

    def load(self, run: str | Path, map_location: str | torch.device = "cpu") -> dict | None:
        """Read ``RUN/checkpoint.pt`` when RUN has one and check that it is this run's; restores nothing.

        Returns:
            The checkpoint dict, or None when RUN has no checkpoint.

        Raises:
            CheckpointError: an unreadable checkpoint or one of another format, or a run with another
                config or process count; the message says what to do.
        """
        path = Path(run) / CHECKPOINT_NAME
        if not path.is_file():
            return None
        try:
            saved = load_checkpoint(run, map_location=map_location)
        except CheckpointError as error:
            raise CheckpointError(f"{error}; or choose another RUN") from None
        if saved.get("config") != self.config or saved.get("world_size") != self.world_size:
            before, now = saved.get("config") or {}, self.config
            differ = [
                f"{name}: {before.get(name)!r} there, {now.get(name)!r} now"
                for name in sorted({*before, *now})
                if before.get(name) != now.get(name)
            ]
            if saved.get("world_size") != self.world_size:
                differ.append(f"processes: {saved.get('world_size')} there, {self.world_size} now")
            raise CheckpointError(
                f"{run} holds a run with other options ({'; '.join(differ)}; {path}): give the same options to resume "
                "it (an option missing there had its old default, e.g. --augment cpu), or choose another RUN or "
                "delete it"
            )
        return saved

    def restore_progress(self, saved: dict) -> None:
        """Take the counters (``epoch``, ``step``, ``epoch_step``, ``switch_step``, ``seconds``) from a checkpoint
        dict."""
        self.epoch, self.step, self.switch_step = saved["epoch"], saved["step"], saved["switch_step"]
        self.epoch_step = int(saved.get("epoch_step", 0))
        self.seconds = float(saved.get("seconds", 0.0))

    def restore_training(self, saved: dict) -> None:
        """Load the model's and optimiser's states, the switch, the saved generator states (:attr:`rng`,
        applied by the trainer) and the sample / skip counters from a checkpoint dict, to go on training."""
        training = saved["training"]
        self.model.load_state_dict(training["model"])
        self.optimizer.load_state_dict(training["optimizer"])
        self.switch = AdaptiveSwitch()
        self.switch.load_state_dict(training["switch"])
        self.rng = training.get("rng")
        self.bad_samples = int(training.get("bad_samples", 0))
        self.skipped_steps = int(training.get("skipped_steps", 0))
        self.consecutive_skips = int(training.get("consecutive_skips", 0))
        if self.guard is not None:
            self.guard = GuardedSwitch(**training["guard"])
            self.trial_snapshot = training["trial_snapshot"]


class RunFolder:
    """RUN as the training processes keep it: ``checkpoint.pt`` (saved with every process's random generators, read
    back to resume), ``verified_shards.json`` (the shards the run has checked) and ``skipped.jsonl`` (the samples it
    could not use); rank 0 writes them all (every rank's skipped samples are gathered to it first).

    Args:
        path: RUN.
        state: the :class:`TrainingState` its checkpoint saves and restores.
        ranks: the training processes.
        device: this process's device (its CUDA generator is saved; a checkpoint is read onto it).

    Attributes:
        saved_step: the step of the last checkpoint in RUN (None: none yet).
        verified: the shards whose SHA-256 this run has checked, ``{name: sha256}``.
    """

    def __init__(self, path: str | Path, state: TrainingState, ranks: Ranks, device: torch.device) -> None:
        self.path, self.state, self.ranks, self.device = Path(path), state, ranks, device
        self.saved_step: int | None = None
        self.verified: dict[str, str] = {}
        self._verified_written: dict[str, str] = {}

    def finished(self, epochs: int) -> bool:
        """Whether RUN holds this run finished (all ``epochs`` trained and summary.json written)."""
        return run_finished(self.path, self.state.epoch, epochs)

    def resume(self, epochs: int) -> bool:
        """Restore RUN's checkpoint when it has one (only the counters when the run of ``epochs`` is finished), with
        this rank's random generators; returns whether it had one.

        Raises:
            TrainingError: an unreadable checkpoint, or one of another run (the message says what to do).
        """
        try:
            saved = self.state.load(self.path, map_location=self.device)
        except CheckpointError as error:
            raise TrainingError(str(error)) from None
        if saved is None:
            return False
        self.state.restore_progress(saved)
        self.saved_step = self.state.step
        if not self.finished(epochs):  # a finished run needs no training state
            self.state.restore_training(saved)
            if self.state.rng is not None and len(self.state.rng) > self.ranks.rank:
                set_rng_state(self.state.rng[self.ranks.rank], self.device)
        return True

    def load_verified(self, shards: list[ShardRecord]) -> None:
        """Read RUN/verified_shards.json: the shards this run already checked whose hash the index (``shards``, its
        records) still records."""
        try:
            recorded = json.loads((self.path / VERIFIED_NAME).read_text())["shards"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = {}
        current = {shard["name"]: shard["sha256"] for shard in shards}
        if not isinstance(recorded, dict):
            recorded = {}
        self.verified = {name: digest for name, digest in recorded.items() if current.get(name) == digest}
        self._verified_written = dict(self.verified)

    def save(self) -> None:
        """Save the checkpoint with every rank's generator states (rank 0 writes it) and the shards checked so
        far (RUN/verified_shards.json); every rank calls it at the same step.

        Raises:
            OSError: a file cannot be written.
        """
        states, verified = [rng_state(self.device)], dict(self.verified)
        if self.ranks.world > 1:
            gathered: list = [None] * self.ranks.world
            dist.all_gather_object(gathered, (states[0], verified))
            states = [state for state, _ in gathered]
            for _, shards in gathered:
                verified.update(shards)
            self.verified = verified
        if self.ranks.rank == 0:
            self.state.rng = states
            self.state.save(self.path)
            if verified != self._verified_written:
                write_json_atomic(self.path / VERIFIED_NAME, {"shards": verified})
                self._verified_written = dict(verified)
        self.saved_step = self.state.step

    def checkpoint_note(self) -> str:
        """Where the last good checkpoint is, for a message that stops the run."""
        if self.saved_step is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is {self.path / CHECKPOINT_NAME} (step {self.saved_step})"

    def truncate_log(self, name: str, step: int) -> None:
        """Rank 0: keep the lines of RUN/<name> (JSON lines with a ``step``) up to ``step``."""
        path = self.path / name
        if path.is_file():
            kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
            write_atomic(path, "".join(kept).encode())

    def write_skipped(self, records: list[dict], total: int) -> list[dict]:
        """Append the unusable samples of a step, this rank's ``records`` and the other ranks' (``total`` of them
        over all ranks, as every rank counted), to RUN/skipped.jsonl; every rank calls it at the same step and gets
        back all ranks' records, in rank order.

        Only rank 0 writes: the ranks' records are gathered to it when ``total`` is not 0 (a collective, so rarely
        run). Every rank once appended its own lines (O_APPEND), which is atomic on a local file system only:
        appends from several nodes to one file on NFS can overwrite each other's lines.

        Raises:
            OSError: the file cannot be written.
        """
        if self.ranks.world > 1 and total:
            gathered: list = [None] * self.ranks.world
            dist.all_gather_object(gathered, records)
            records = [record for rank_records in gathered for record in rank_records]
        if not records or self.ranks.rank != 0:
            return records
        data = "".join(json.dumps(record) + "\n" for record in records).encode()
        handle = os.open(self.path / SKIPPED_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(handle, data)
        finally:
            os.close(handle)
        return records
