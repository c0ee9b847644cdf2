"""``RUN/checkpoint.pt``: the file a training run saves, and rebuilding its backbone from it.

Written by ``rela train`` (:class:`rela_train.run_state.TrainingState`, which holds what resuming needs), read by
``rela eval``, ``rela study`` and ``run:`` priors (:func:`load_backbone`): the one checkpoint format both stages
know. A checkpoint is a plain dict of tensors, numbers, strings and lists (no pickled classes), so it is always
read with ``torch.load(weights_only=True)``: loading a checkpoint never runs code from it. Its keys (format
``rela-checkpoint-v2``): ``arch``, ``input_size``, ``stem``, ``feature_dim`` and ``backbone`` (the backbone's state
dict: all that :func:`load_backbone` and ``run:`` priors read), ``config`` (the resolved ``TrainConfig`` as a dict,
less the run-time options), ``data``, ``dataset`` (the dataset's
:meth:`~rela_convert.dataset.index.DatasetIndex.identity`; checked before resuming by
:func:`rela_train.integrity.check_run_dataset`), ``world_size``, ``epoch``, ``step``, ``epoch_step`` (steps taken
in the unfinished epoch: a checkpoint saved within an epoch resumes there), ``switch_step``, ``seconds`` (training
time so far over every call) and ``training`` (what resuming needs: ``model``, ``optimizer``, ``switch``, ``rng``:
the random generators' states of every training process (:func:`rela_train.run_state.rng_state`), the counters
``bad_samples``, ``skipped_steps``, ``consecutive_skips``, and under ``--rela guarded`` ``guard``, the
:class:`~rela_train.handover.GuardedSwitch`, with ``trial_snapshot``, the model and optimiser as they were when a
trial of the method began, while one runs), ``format``. Checkpoints written before ``epoch_step``, ``rng`` and the
counters were added resume at their epoch's end, with fresh generators.

Importing this module imports nothing heavy (torch is imported when a checkpoint is read or written).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

from rela_convert.dataset.files import write_atomic

if TYPE_CHECKING:
    import torch
    from torch import nn

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "rela-checkpoint-v2"


def run_finished(run: str | Path, epoch: int, epochs: int) -> bool:
    """Whether RUN holds a finished run: ``epoch`` (epochs trained, from its checkpoint) has reached ``epochs`` and
    ``RUN/summary.json`` has been written."""
    return epoch >= epochs and (Path(run) / "summary.json").is_file()


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of another format; the message names the fix."""


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` (with ``"format": CHECKPOINT_FORMAT`` added) to ``path`` atomically (temporary
    file, fsync, rename): a kill while saving leaves the previous checkpoint intact.

    Raises:
        OSError: the file cannot be written.
    """
    import torch

    buffer = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT}, buffer)
    write_atomic(path, buffer.getvalue())
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def load_checkpoint(run: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read ``RUN/checkpoint.pt`` with ``weights_only=True``.

    Raises:
        CheckpointError: no checkpoint, an unreadable file, or another checkpoint format.
    """
    import torch

    path = Path(run) / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: train first with rela train DATA {run}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many kinds for damaged or foreign files
        raise CheckpointError(
            f"{path} cannot be read as a rela checkpoint ({type(error).__name__}: a damaged or truncated file, or "
            "not a checkpoint; rela never unpickles code): train again into a new RUN"
        ) from None
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
    from rela_convert.backbones import build_backbone

    state = load_checkpoint(run)
    backbone, _ = build_backbone(state["arch"], state["input_size"], state["stem"])
    backbone.load_state_dict(state["backbone"])
    return backbone.eval(), int(state["input_size"])
