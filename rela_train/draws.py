"""Where the views' random parameters come from: uniform numbers for a batch, one row per image.

:meth:`rela_train.device_views.DeviceView.sample` turns uniform numbers into a view's parameters (crop box, flip,
jitter factors and order, greyscale, blur sigma, solarisation). It takes them from a :class:`Draws`:

- :class:`GeneratorDraws`: a ``torch.Generator`` seeded per batch (``--augment device``: the views of a batch are a
  function of (seed, epoch, step, rank), :func:`rela_train.device_views.step_seed`);
- :class:`KeyedDraws`: a counter-based stream per image, seeded by (seed, epoch, key)
  (:func:`rela_train.data.batch.sample_seed`), so an image's views are a function of the image alone, whatever
  batch, worker or process makes them (``--augment dali``).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


class Draws(Protocol):
    """Uniform numbers in ``[0, 1)`` for a batch of ``count`` images."""

    count: int

    def uniform(self, columns: int | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
        """The next numbers: ``[count]`` (``columns`` None) or ``[count, columns]``, of ``dtype``, on the CPU."""
        ...


class GeneratorDraws:
    """:class:`Draws` from a ``torch.Generator``: ``torch.rand`` of the requested shape (row-major, so the numbers
    and their order are exactly those of ``torch.rand(shape, generator=generator, dtype=dtype)``).

    Args:
        generator: a CPU generator; count: images in the batch.
    """

    def __init__(self, generator: torch.Generator, count: int) -> None:
        self.generator, self.count = generator, count

    def uniform(self, columns: int | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
        shape = (self.count,) if columns is None else (self.count, columns)
        return torch.rand(shape, generator=self.generator, dtype=dtype)


class KeyedDraws:
    """:class:`Draws` with one independent stream per image: number ``j`` of image ``i`` is SplitMix64 (Steele,
    Lea, Flood, OOPSLA 2014) of ``seeds[i] + (j + 1) * 0x9E3779B97F4A7C15``, its top 53 bits (float64) or 24 bits
    (float32) scaled to ``[0, 1)``. Row ``i`` depends on ``seeds[i]`` and on how many numbers were drawn before,
    nothing else: the same image gets the same parameters in any batch.

    Args:
        seeds: one 64-bit seed per image (e.g. :func:`rela_train.data.batch.sample_seed` of its key), ints in
            ``[0, 2**64)``.
    """

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = np.array(seeds, dtype=np.uint64)
        self.count = len(self.seeds)
        self.drawn = 0
        self.block = np.empty((self.count, 0), dtype=np.uint64)  # numbers made ahead, in blocks of BLOCK columns

    #: Columns made at once (one vectorised pass instead of one per request).
    BLOCK = 64

    def uniform(self, columns: int | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
        width = 1 if columns is None else columns
        while self.block.shape[1] < width:
            self.block = np.concatenate([self.block, self._mix(self.drawn + self.block.shape[1], self.BLOCK)], axis=1)
        z, self.block = self.block[:, :width], self.block[:, width:]
        self.drawn += width
        if dtype == torch.float64:
            values = (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
        else:
            values = ((z >> np.uint64(40)).astype(np.float64) * 2.0**-24).astype(np.float32)
        result = torch.from_numpy(values)
        return result[:, 0] if columns is None else result

    def _mix(self, first: int, width: int) -> np.ndarray:
        """SplitMix64 outputs ``first + 1`` to ``first + width`` of every row: uint64 ``[count, width]``."""
        counters = np.arange(first + 1, first + 1 + width, dtype=np.uint64)
        with np.errstate(over="ignore"):
            z = self.seeds[:, None] + counters[None, :] * _GOLDEN
            z = (z ^ (z >> np.uint64(30))) * _MIX_1
            z = (z ^ (z >> np.uint64(27))) * _MIX_2
            return z ^ (z >> np.uint64(31))
