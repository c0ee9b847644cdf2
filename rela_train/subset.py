"""The dynamic distilled subset: which samples an epoch trains on (method.md, stage 1, step 3).

With data ratio ``r`` every epoch trains on ``floor(r * N)`` samples drawn
uniformly without replacement, afresh each epoch (Sun, Jiang, Lin, NeurIPS 2024,
Sec. 4.1 and the reference code).
"""

from __future__ import annotations

import math

import numpy as np


def subset_size(num_samples: int, data_ratio: float) -> int:
    """``floor(r * N)``, at least 1.

    Raises:
        ValueError: ``data_ratio`` outside (0, 1].
    """
    if not 0 < data_ratio <= 1:
        raise ValueError(f"data ratio must be in (0, 1], got {data_ratio}")
    return max(1, math.floor(data_ratio * num_samples + 1e-9))


def draw_random(keys: np.ndarray, data_ratio: float, seed: int, epoch: int) -> np.ndarray:
    """The keys an epoch trains on under the paper's ``random`` rule.

    Args:
        keys: int64 ``[N]`` sample keys of the converted dataset.
        data_ratio: r in (0, 1].
        seed: run seed; the draw depends only on ``(seed, epoch)``.
        epoch: 0-based epoch.

    Returns:
        Sorted int64 ``[floor(r*N)]`` keys, distinct.
    """
    generator = np.random.default_rng([seed, epoch])
    chosen = generator.choice(len(keys), size=subset_size(len(keys), data_ratio), replace=False)
    return np.sort(keys[chosen])


def key_mask(chosen: np.ndarray, max_key: int) -> np.ndarray:
    """Boolean ``[max_key + 1]`` membership mask of the chosen keys (cheap per-sample lookup)."""
    mask = np.zeros(max_key + 1, dtype=bool)
    mask[chosen] = True
    return mask
