"""SemDeDup-style near-duplicate removal inside k-means clusters (Abbas et al., 2023).

Within each cluster of the spherical k-means (:mod:`rela_convert.clustering`),
images whose cosine similarity to a *kept* image of the same cluster exceeds
``1 - eps`` are near-duplicates. Members are visited in key order (the order of
the sorted source listing, whatever the order of the rows: a dataset stores its
samples in a seeded pseudo-random order) and an image is removed when it is that similar to an
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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from rela_convert.optional import require

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


def _cluster_duplicates(block: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy near-duplicate removal inside one cluster (rows in key order).

    Returns:
        ``(kept bool [n], source int64 [n] (position of the kept duplicate, -1), similar pairs)``.
    """
    kept = np.ones(len(block), bool)
    source = np.full(len(block), -1, np.int64)
    faiss = require("faiss", "the dedup subset strategy")
    index = faiss.IndexFlatIP(block.shape[1])
    index.add(block)
    limits, _, neighbours = index.range_search(block, 1.0 - eps)
    neighbours = neighbours.astype(np.int64)
    # Earlier similar members of each member (positions within the cluster).
    rows = np.repeat(np.arange(len(block)), np.diff(limits.astype(np.int64)))
    earlier = neighbours < rows
    rows, neighbours = rows[earlier], neighbours[earlier]
    if len(rows):
        # rows are non-decreasing (range_search answers queries in order), so a member's
        # candidates are decided before it is: greedy in key order against kept members.
        starts = np.flatnonzero(np.diff(rows)) + 1
        for row, candidates in zip(rows[np.concatenate([[0], starts])], np.split(neighbours, starts)):
            alive = candidates[kept[candidates]]
            if len(alive):
                kept[row] = False
                source[row] = alive.min()
    return kept, source, len(rows)


def deduplicate(
    features: np.ndarray, cluster: np.ndarray, keys: np.ndarray, eps: float = DEFAULT_EPS, threads: int | None = None
) -> Deduplication:
    """Remove near-duplicates within clusters (see the module docstring).

    Clusters are searched in parallel, each by single-threaded faiss (faiss releases
    the GIL), largest first: thousands of small searches each with its own OpenMP
    team were several times slower, worst on shared cores. The result does not
    depend on the number of threads.

    Args:
        features: float32 ``[N, d]``, L2-normalised, rows in any order (a dataset's stored order).
        cluster: int ``[N]`` cluster of every row.
        keys: int64 ``[N]`` distinct key of every row; members of a cluster are visited in key order.
        eps: threshold: a pair is a near-duplicate when its cosine similarity exceeds ``1 - eps``.
        threads: parallel searches; None: faiss's OpenMP thread count (the cores).

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
    order = np.lexsort((keys, cluster))  # members of a cluster contiguous, in key order
    groups = [members for members in np.split(order, np.flatnonzero(np.diff(cluster[order])) + 1) if len(members) > 1]
    groups.sort(key=len, reverse=True)
    faiss = require("faiss", "the dedup subset strategy")
    threads = threads or faiss.omp_get_max_threads()

    def work(members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        faiss.omp_set_num_threads(1)  # per thread: the OpenMP thread count is a per-thread setting
        return (members, *_cluster_duplicates(np.ascontiguousarray(features[members], dtype=np.float32), eps))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(work, groups))
    similar_pairs = 0
    for members, kept, source, pairs in results:
        similar_pairs += pairs
        keep[members] = kept
        duplicate_of[members[~kept]] = members[source[~kept]]
    return Deduplication(keep, duplicate_of, int(similar_pairs))
