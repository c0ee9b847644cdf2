"""The epoch plan: which samples each rank and DataLoader worker trains on in one epoch, in which order.

Per epoch, every process and worker derives the same :class:`EpochPlan` from ``(seed, epoch)``: the epoch's subset
(method.md, step 3; :mod:`rela_convert.dataset.subset`), a shuffled shard order, and the subset's keys in that order
cut into equal contiguous shares, one per rank, and within a rank one per worker in whole batches
(:meth:`EpochPlan.share`). So every rank runs exactly the same number of steps, and every sample of the epoch's
subset is seen once in total, except the fewer than ``world x batch`` that do not fill a last step.
:func:`worker_schedule` says which worker delivers each batch, which lets an epoch start at any step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rela_convert.dataset.subset import SubsetStrategy, key_mask


@dataclass(frozen=True)
class EpochPlan:
    """Which samples each rank and worker trains on in one epoch.

    Attributes:
        keys: int64 ``[world * steps * batch_size]``: the epoch's subset keys in
            shuffled shard order, truncated to whole steps on every rank.
        shard_order: int ``[num_shards]``: the epoch's shard order.
        shard_of_key: int ``[len(keys)]``: shard index holding each key.
        steps: optimiser steps per rank.
    """

    keys: np.ndarray
    shard_order: np.ndarray
    shard_of_key: np.ndarray
    steps: int

    @classmethod
    def make(
        cls,
        dataset_keys: np.ndarray,
        shard_sizes: list[int],
        data_ratio: float,
        seed: int,
        epoch: int,
        world: int,
        batch_size: int,
        subset: SubsetStrategy | None = None,
    ) -> "EpochPlan":
        """Draw the epoch's subset and lay it out in a shuffled shard order.

        Args:
            dataset_keys: int64 ``[N]`` keys in stored shard order.
            shard_sizes: samples per shard, in stored order (sums to N).
            subset: the draw rule (:mod:`rela_convert.dataset.subset`); None: ``random``.

        Raises:
            ValueError: the subset is smaller than one step on every rank.
        """
        drawn = (subset or SubsetStrategy()).draw(dataset_keys, data_ratio, seed, epoch)
        steps = len(drawn) // (world * batch_size)  # dedup may draw fewer than floor(r*N)
        if steps == 0:
            raise ValueError(
                f"floor(data ratio {data_ratio} x {len(dataset_keys)} samples) is less than one step of "
                f"{world} ranks x batch {batch_size}; raise --data-ratio or lower --batch-size"
            )
        chosen = key_mask(drawn, int(dataset_keys.max()))
        order = np.random.default_rng([seed, epoch, 1]).permutation(len(shard_sizes))
        starts = np.concatenate([[0], np.cumsum(shard_sizes)])
        keys = [dataset_keys[starts[shard] : starts[shard + 1]] for shard in order]
        shard_ids = [np.full(len(part), shard) for part, shard in zip(keys, order)]
        all_keys, all_shards = np.concatenate(keys), np.concatenate(shard_ids)
        kept = chosen[all_keys]
        total = steps * world * batch_size
        return cls(all_keys[kept][:total], order, all_shards[kept][:total], steps)

    def share(self, rank: int, world: int, worker: int, workers: int, batch_size: int) -> tuple[np.ndarray, list[int]]:
        """The keys of one (rank, worker) and the shards to read for them, in epoch order.

        A rank's share is ``steps * batch_size`` consecutive keys; its workers split
        it in whole batches (worker ``w`` gets batches ``w*steps//workers`` to
        ``(w+1)*steps//workers``).

        Returns:
            ``(keys int64 [n], shard indices)``.
        """
        first_batch, last_batch = worker * self.steps // workers, (worker + 1) * self.steps // workers
        start = (rank * self.steps + first_batch) * batch_size
        stop = (rank * self.steps + last_batch) * batch_size
        needed = set(self.shard_of_key[start:stop].tolist())
        shards = [int(shard) for shard in self.shard_order if shard in needed]
        return self.keys[start:stop], shards


def worker_schedule(steps: int, workers: int) -> np.ndarray:
    """Which worker delivers each batch of a rank's epoch, in the order the DataLoader yields them.

    Worker ``w`` holds batches ``w*steps//workers`` to ``(w+1)*steps//workers`` of the rank's share
    (:meth:`EpochPlan.share`); the DataLoader takes one batch from each worker in turn, skipping
    workers that have none left. With ``workers == 0`` (in-process loading) there is one worker.

    Returns:
        int64 ``[steps]``: the worker index of batch ``i`` of the epoch.
    """
    workers = max(workers, 1)
    counts = [(w + 1) * steps // workers - w * steps // workers for w in range(workers)]
    order = [w for r in range(max(counts, default=0)) for w in range(workers) if r < counts[w]]
    return np.asarray(order, dtype=np.int64)
