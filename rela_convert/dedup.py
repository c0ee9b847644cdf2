"""SemDeDup-style near-duplicate removal inside k-means clusters (Abbas et al., 2023).

Within each cluster of the spherical k-means (:mod:`rela_convert.clustering`),
images whose cosine similarity to a *kept* image of the same cluster exceeds
``1 - eps`` are near-duplicates. Members are visited in key order (the order of
the sorted source listing) and an image is removed when it is that similar to an
earlier image that was kept, so every group of near-duplicates keeps exactly its
first member, deterministically, and a chain ``a ~ b ~ c`` with ``a`` not
similar to ``c`` keeps ``a`` and ``c``.

The similar pairs of a cluster come from an exact faiss range search
(``IndexFlatIP.range_search``, inner products above ``1 - eps``) of the cluster
against itself, so the cost is ``sum_c n_c^2 x d`` multiply-adds (about
``N^2 / k x d`` for balanced clusters) and the memory is one cluster plus its
similar pairs. faiss has no GPU range search: this step runs on the CPU even
with faiss-gpu. Duplicates split across two clusters are not found (the
SemDeDup approximation); exact copies always share a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

#: Default ``eps``: pairs with cosine similarity above 0.9 (centred prior features) are near-duplicates.
DEFAULT_EPS = 0.1


@dataclass(frozen=True)
class Deduplication:
    """Result of :func:`deduplicate`.

    Attributes:
        keep: bool ``[N]``: True for images kept in the pool.
        duplicate_of: int64 ``[N]``: for a removed image the row of the kept image it
            duplicates, -1 for kept images.
        similar_pairs: number of similar pairs (unordered, within clusters) the search found.
    """

    keep: np.ndarray
    duplicate_of: np.ndarray
    similar_pairs: int

    @property
    def num_removed(self) -> int:
        return int((~self.keep).sum())


def deduplicate(features: np.ndarray, cluster: np.ndarray, eps: float = DEFAULT_EPS) -> Deduplication:
    """Remove near-duplicates within clusters (see the module docstring).

    Args:
        features: float32 ``[N, d]``, L2-normalised, rows in key order.
        cluster: int ``[N]`` cluster of every row.
        eps: threshold: a pair is a near-duplicate when its cosine similarity exceeds ``1 - eps``.

    Returns:
        :class:`Deduplication` (rows are positions in ``features``).

    Raises:
        ValueError: ``eps`` outside (0, 2).
    """
    if not 0 < eps < 2:
        raise ValueError(f"dedup eps must be in (0, 2), got {eps}")
    count = len(features)
    keep = np.ones(count, bool)
    duplicate_of = np.full(count, -1, np.int64)
    similar_pairs = 0
    order = np.argsort(cluster, kind="stable")  # members of a cluster contiguous, in row (= key) order
    bounds = np.flatnonzero(np.diff(cluster[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        block = np.ascontiguousarray(features[members], dtype=np.float32)
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(block)
        limits, _, neighbours = index.range_search(block, 1.0 - eps)
        neighbours = neighbours.astype(np.int64)
        # Earlier similar members of each member (positions within the cluster).
        rows = np.repeat(np.arange(len(members)), np.diff(limits.astype(np.int64)))
        earlier = neighbours < rows
        similar_pairs += int(earlier.sum())
        rows, neighbours = rows[earlier], neighbours[earlier]
        if not len(rows):
            continue
        kept = np.ones(len(members), bool)
        source = np.full(len(members), -1, np.int64)
        # rows are non-decreasing (range_search answers queries in order), so a member's
        # candidates are decided before it is: greedy in key order against kept members.
        starts = np.flatnonzero(np.diff(rows)) + 1
        for row, candidates in zip(rows[np.concatenate([[0], starts])], np.split(neighbours, starts)):
            alive = candidates[kept[candidates]]
            if len(alive):
                kept[row] = False
                source[row] = alive.min()
        keep[members] = kept
        removed = ~kept
        duplicate_of[members[removed]] = members[source[removed]]
    return Deduplication(keep, duplicate_of, int(similar_pairs))
