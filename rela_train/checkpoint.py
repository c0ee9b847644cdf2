"""``RUN/checkpoint.pt``: what a training run saves, restoring a run from it, and rebuilding its backbone.

A checkpoint is a plain dict of tensors, numbers, strings and lists (no pickled classes), so it is
always read with ``torch.load(weights_only=True)``: loading a checkpoint never runs code from it.
Its keys (format ``rela-checkpoint-v2``): ``arch``, ``input_size``, ``stem``, ``feature_dim`` and
``backbone`` (the backbone's state dict: all that :func:`load_backbone` and ``run:`` priors read),
``config`` (the resolved ``TrainConfig`` as a dict), ``data``, ``world_size``, ``epoch``, ``step``,
``switch_step`` and ``training`` (``model``, ``optimizer``, ``switch``: what resuming needs), ``format``.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from rela_convert.index import write_atomic
from rela_train.backbones import build_backbone
from rela_train.rela import AdaptiveSwitch

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "rela-checkpoint-v2"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another format; the message names the fix."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` (with ``"format": CHECKPOINT_FORMAT`` added) to ``path`` atomically (temporary
    file, fsync, rename): a kill while saving leaves the previous checkpoint intact.

    Raises:
        OSError: the file cannot be written.
    """
    buffer = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT}, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(run: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read ``RUN/checkpoint.pt`` with ``weights_only=True``.

    Raises:
        CheckpointError: no checkpoint, an unreadable file, or another checkpoint format.
    """
    path = Path(run) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: train first with rela train DATA {run}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many kinds for damaged or foreign files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} cannot be read as a rela checkpoint ({first})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is {found!r}, not {CHECKPOINT_FORMAT!r}: train it again with this rela")
    return state


def load_backbone(run: str | Path) -> tuple[nn.Module, int]:
    """Rebuild the trained backbone of a run from ``RUN/checkpoint.pt``.

    Returns:
        ``(backbone in eval mode on the CPU, input_size in pixels)``; the backbone maps float
        ``[B, 3, S, S]`` to float ``[B, D_target]``.

    Raises:
        CheckpointError: see :func:`load_checkpoint`.
    """
    state = load_checkpoint(run)
    backbone, _ = build_backbone(state["arch"], state["input_size"], state["stem"])
    backbone.load_state_dict(state["backbone"])
    return backbone.eval(), int(state["input_size"])


@dataclass
class TrainingState:
    """One run's training objects and progress: what ``rela train`` saves after every epoch and restores
    when started again on the same RUN.

    Attributes:
        config: the resolved ``TrainConfig`` as a dict; with ``world_size``, what makes a checkpoint
            this run's (another config or process count is refused).
        data: the converted dataset folder, resolved.
        world_size: training processes.
        feature_dim: D_target of the backbone.
        model: the trained module; ``model.method.backbone`` is the backbone.
        optimizer: its optimiser.
        switch: the adaptive switch's running losses.
        epoch: epochs finished.
        step: optimiser steps taken (each over all processes).
        switch_step: the step at which ReLA ended; None while it has not.
    """

    config: dict
    data: str
    world_size: int
    feature_dim: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    switch: AdaptiveSwitch = field(default_factory=AdaptiveSwitch)
    epoch: int = 0
    step: int = 0
    switch_step: int | None = None

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
            "world_size": self.world_size,
            "epoch": self.epoch,
            "step": self.step,
            "switch_step": self.switch_step,
            "training": {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "switch": asdict(self.switch),
            },
        }

    def save(self, run: str | Path) -> None:
        """Write ``RUN/checkpoint.pt`` atomically.

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
            raise CheckpointError(f"{run} holds a run with other options ({path}); choose another RUN or delete it")
        return saved

    def restore_progress(self, saved: dict) -> None:
        """Take the counters (``epoch``, ``step``, ``switch_step``) from a checkpoint dict."""
        self.epoch, self.step, self.switch_step = saved["epoch"], saved["step"], saved["switch_step"]

    def restore_training(self, saved: dict) -> None:
        """Load the model's and optimiser's states and the switch from a checkpoint dict, to go on training."""
        self.model.load_state_dict(saved["training"]["model"])
        self.optimizer.load_state_dict(saved["training"]["optimizer"])
        self.switch = AdaptiveSwitch(**saved["training"]["switch"])
