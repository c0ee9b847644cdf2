"""One step's batch (:class:`Batch`) and what makes its augmentations a function of (seed, epoch, key).

A sample's views are seeded by (seed, epoch, key) (:func:`sample_seed`, :func:`seed_augmentations`): they depend on
nothing else (not on the worker, the batch or what was read before), which is what lets a run resume at any step;
views made in the training process leave its own generators untouched (:func:`preserved_global_rng`).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import NamedTuple

import numpy as np
import torch


def sample_seed(seed: int, epoch: int, key: int) -> int:
    """Seed (an int in ``[0, 2**64)``) of the augmentations of sample ``key`` in ``epoch`` of a run
    seeded with ``seed``: a sample's views depend on nothing else (not on the worker, the batch
    or what was read before), which is what lets a run resume at any step."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def seed_augmentations(seed: int) -> None:
    """Seed the generators the views draw from: torch's CPU generator, Python's ``random`` and
    NumPy's global generator (lightly's blur and solarisation)."""
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def preserved_global_rng():
    """Restore torch's CPU generator, Python's ``random`` and NumPy's global generator on exit: views made in
    the training process (``workers == 0``) leave the training's own randomness untouched."""
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class Batch(NamedTuple):
    """One step's batch of one rank, as :meth:`rela_train.data.stream.TrainStream.loader` yields it with
    ``reports=True``.

    Attributes:
        view_1, view_2: float32 ``[B, 3, S, S]``; with views made on the device (``TrainStream.augment ==
            "device"``): the decoded pictures uint8 ``[B, 3, H, W]`` and their sizes int64 ``[B, 4]``
            (:func:`rela_train.device_views.stack_decoded`).
        features: float32 ``[B, D_prior]`` raw prior features.
        labels: int64 ``[B]`` (-1 without class folders).
        keys: int64 ``[B]``: the dataset key of each row's sample (a replaced sample's row holds its replacement's).
        report: ``{"bad": [{"key", "shard", "reason"}, ...]`` (samples that could not be used: each was
            replaced by another sample of the batch, or, when none could be used, the batch is a copy of the next
            usable one), ``"verified": {shard name: sha256}`` (shards whose
            hash this worker checked since its last batch), ``"error"``: None, or a one-line message:
            the stream cannot go on and the batch's tensors are empty}.
    """

    view_1: torch.Tensor
    view_2: torch.Tensor
    features: torch.Tensor
    labels: torch.Tensor
    keys: torch.Tensor
    report: dict
