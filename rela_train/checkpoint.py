"""``RUN/checkpoint.pt``: what a training run saves, and rebuilding its backbone from it.

A checkpoint is a plain dict of tensors, numbers, strings and lists (no pickled classes), so it is
always read with ``torch.load(weights_only=True)``: loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from rela_convert.index import write_atomic
from rela_train.backbones import build_backbone

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
