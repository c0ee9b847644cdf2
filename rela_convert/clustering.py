"""Spherical k-means of L2-normalised features with faiss, for the distilled subset strategies.

The clustering behind ``dedup``, ``balanced``, ``prototypical`` and ``hard``
(:mod:`rela_convert.selection`): features on the unit sphere, centroids
re-normalised after every update (``spherical=True``), so that the inner product
of a feature and its centroid is their cosine similarity. This is the clustering
of SemDeDup (Abbas et al., 2023) and of the self-supervised prototype metric of
Sorscher et al. (NeurIPS 2022).

Scaling: k-means is trained on a seeded sample of at most
``max_points_per_centroid x k`` points (faiss's own cap, applied here so the
sample is chosen by our seed and the full array is never copied); all points are
then assigned to their nearest centroid by an exact inner-product search.

faiss-cpu and faiss-gpu both install the ``faiss`` module; with faiss-gpu and a
visible GPU, :func:`faiss_gpus` is non-zero and k-means and the assignment run
on all GPUs (swap one package for the other; nothing else changes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rela_convert.optional import require

#: faiss's default cap on k-means training points per centroid.
MAX_POINTS_PER_CENTROID = 256
#: Lloyd iterations (faiss's default is 25; 20 is the usual choice for SemDeDup-style runs).
NITER = 20
#: Upper bound of the default number of clusters (Sorscher et al. used 1,000 on ImageNet-1K).
MAX_DEFAULT_CLUSTERS = 1000


def faiss_gpus() -> int:
    """Number of GPUs faiss can use: 0 with faiss-cpu or without a visible GPU."""
    try:
        return int(require("faiss", "k-means clustering").get_num_gpus())
    except AttributeError:
        return 0


def default_num_clusters(num_samples: int) -> int:
    """``round(sqrt(N))`` clusters, at least 1 and at most :data:`MAX_DEFAULT_CLUSTERS`
    (71 for 5,000 images, 224 for 50,000, 1,000 for ImageNet-1K)."""
    return int(min(MAX_DEFAULT_CLUSTERS, max(1, round(np.sqrt(num_samples)))))


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32; all-zero rows stay zero."""
    features = np.asarray(features, np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class Clustering:
    """The result of :func:`spherical_kmeans`.

    Attributes:
        centroids: float32 ``[k, d]``, unit length.
        cluster: int32 ``[N]``: index of each point's nearest centroid.
        similarity: float32 ``[N]``: cosine similarity of each point to that centroid.
        train_points: points k-means was trained on.
        objective: faiss's final objective (sum of the training points' similarities to their centroids).
        gpus: GPUs faiss used (0: CPU).
        seconds: ``{"train", "assign"}`` wall-clock seconds.
    """

    centroids: np.ndarray
    cluster: np.ndarray
    similarity: np.ndarray
    train_points: int
    objective: float
    gpus: int
    seconds: dict


def spherical_kmeans(
    features: np.ndarray,
    num_clusters: int,
    niter: int = NITER,
    seed: int = 0,
    max_points_per_centroid: int = MAX_POINTS_PER_CENTROID,
) -> Clustering:
    """Cluster unit-length features with faiss and assign every point.

    Args:
        features: float32 ``[N, d]``, rows L2-normalised (see :func:`l2_normalise`).
        num_clusters: k (lowered to N when N < k).
        niter: Lloyd iterations.
        seed: seed of the training sample and of faiss's centroid initialisation.
        max_points_per_centroid: training sample cap per centroid; the sample is
            ``min(N, k x max_points_per_centroid)`` points drawn without replacement.

    Returns:
        :class:`Clustering`.

    Raises:
        ValueError: no features, or ``num_clusters < 1``.
    """
    count, dim = features.shape
    if count == 0 or num_clusters < 1:
        raise ValueError(
            f"k-means needs at least one feature and one cluster, got {count} features and k={num_clusters}"
        )
    k = min(num_clusters, count)
    cap = k * max_points_per_centroid
    sample = features
    if count > cap:
        chosen = np.sort(np.random.default_rng([seed, 7]).choice(count, size=cap, replace=False))
        sample = features[chosen]
    faiss = require("faiss", "k-means clustering")
    gpus = faiss_gpus()
    kmeans = faiss.Kmeans(
        dim,
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        verbose=False,
        gpu=gpus or False,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,
    )
    started = time.perf_counter()
    kmeans.train(np.ascontiguousarray(sample, dtype=np.float32))
    centroids = l2_normalise(kmeans.centroids)
    trained = time.perf_counter()
    similarity, cluster = assign(features, centroids)
    seconds = {"train": trained - started, "assign": time.perf_counter() - trained}
    objective = float(kmeans.obj[-1]) if len(kmeans.obj) else float("nan")
    return Clustering(centroids, cluster, similarity, len(sample), objective, gpus, seconds)


def assign(features: np.ndarray, centroids: np.ndarray, block_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every feature by inner product (exact search, in row blocks).

    Returns:
        ``(similarity float32 [N], cluster int32 [N])``.
    """
    faiss = require("faiss", "k-means clustering")
    index = faiss.IndexFlatIP(centroids.shape[1])
    gpus = faiss_gpus()
    if gpus:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    similarity = np.empty(len(features), np.float32)
    cluster = np.empty(len(features), np.int32)
    for start in range(0, len(features), block_rows):
        block = np.ascontiguousarray(features[start : start + block_rows], dtype=np.float32)
        values, ids = index.search(block, 1)
        similarity[start : start + len(block)] = values[:, 0]
        cluster[start : start + len(block)] = ids[:, 0]
    return similarity, cluster
