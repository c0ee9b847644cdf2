"""PCA statistics of prior features, for targets of any dimension (method.md, stage 1, step 2).

ReLA standardises the prior representations before regressing onto them: centre
``Y_raw``, keep the ``d = min(D_target, D_prior)`` eigenvectors of largest
eigenvalue of its covariance, project, and standardise every column to zero mean
and unit variance (Sun, Jiang, Lin, NeurIPS 2024, Sec. 4.1 and the authors'
reference code). Projected column ``i`` has mean 0 and variance ``lambda_i``, so
mean, eigenvectors and eigenvalues are all a trainer needs for any ``d``.

Features are never held as an ``[N, D]`` array: :class:`FeatureMoments` keeps
running float64 sums (count, sum, sum of outer products) that can be merged
across shards and all-reduced across processes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

#: Rows per block when accumulating outer products (bounds float64 temporaries).
BLOCK_ROWS = 1024
#: Eigenvalues below this fraction of the largest are treated as zero (column left at 0).
RELATIVE_EIGENVALUE_FLOOR = 1e-10


def one_blas_thread():
    """Context manager: NumPy's BLAS and LAPACK (OpenBLAS) run on one thread inside it.

    The moments and the eigen-decomposition run in the converting process, on a machine whose cores the DataLoader
    workers (and, on a shared machine, other jobs) keep busy: OpenBLAS's default of one thread per core only adds
    threads that spin waiting for a core. On the 2-core machine with other jobs running, the eigen-decomposition
    of 576-d features (the ImageNet benchmark's prior) cost 0.05 to 4 s of CPU that way against 0.05 s on one
    thread. One thread also makes ``pca.npz`` the same bytes on every machine: the eigenvectors depended, in their
    last bits (about 1e-12) and in the basis of zero-eigenvalue directions, on the number of cores. The moments'
    matrix products give the same bits on any number of threads."""
    return threadpool_limits(limits=1, user_api="blas")


@dataclass
class FeatureMoments:
    """Running sums of feature vectors, float64.

    Attributes:
        count: number of vectors added.
        total: ``[D]`` float64 sum of the vectors.
        outer: ``[D, D]`` float64 sum of their outer products.
    """

    count: int
    total: np.ndarray
    outer: np.ndarray

    @classmethod
    def zeros(cls, dim: int) -> "FeatureMoments":
        """Empty moments for ``dim``-dimensional features."""
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureMoments":
        """Moments of a float ``[n, D]`` block, summed in fixed blocks of :data:`BLOCK_ROWS`
        rows so that the same rows always give bit-identical sums (on one BLAS thread, :func:`one_blas_thread`)."""
        moments = cls.zeros(features.shape[1])
        with one_blas_thread():
            for start in range(0, len(features), BLOCK_ROWS):
                block = features[start : start + BLOCK_ROWS].astype(np.float64)
                moments.count += len(block)
                moments.total += block.sum(axis=0)
                moments.outer += block.T @ block
        return moments

    def __iadd__(self, other: "FeatureMoments") -> "FeatureMoments":
        self.count += other.count
        self.total += other.total
        self.outer += other.outer
        return self

    def all_reduce(self) -> None:
        """Sum the moments of all ranks in place (``torch.distributed``, float64)."""
        import torch.distributed as dist

        packed = torch.from_numpy(np.concatenate([[float(self.count)], self.total, self.outer.ravel()]))
        dist.all_reduce(packed)
        values = packed.numpy()
        self.count = int(round(values[0]))
        self.total = values[1 : 1 + len(self.total)].copy()
        self.outer = values[1 + len(self.total) :].reshape(self.outer.shape).copy()


def standardised_targets(features: torch.Tensor, mean: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The ReLA targets of raw prior features: ``(features - mean) @ weight`` (method.md, stage 1, step 2), with
    ``(mean, weight)`` from :meth:`PCAStatistics.projection`; what ``rela train`` and
    :func:`rela_train.rela_loader` both apply.

    Args:
        features: float ``[B, D_prior]``.
        mean: float32 ``[D_prior]``; weight: float32 ``[D_prior, d]``, on the features' device.

    Returns:
        float32 ``[B, d]``, each column zero-mean and unit-variance over the dataset.
    """
    return (features.float() - mean) @ weight


@dataclass
class PCAStatistics:
    """Mean and eigen-decomposition of the prior features' covariance.

    Attributes:
        mean: ``[D]`` float64 feature mean.
        components: ``[D, D]`` float64; column ``i`` is the eigenvector with the
            ``i``-th largest eigenvalue (sign fixed so its largest-magnitude entry is positive).
        eigenvalues: ``[D]`` float64, descending, population covariance (divided by N).
        count: number of features the statistics were fitted on.
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    count: int

    @classmethod
    def fit(cls, moments: FeatureMoments) -> "PCAStatistics":
        """Eigen-decompose the covariance of accumulated moments (LAPACK on one thread, :func:`one_blas_thread`).

        Raises:
            ValueError: fewer than two features were accumulated.
        """
        if moments.count < 2:
            raise ValueError(f"PCA needs at least 2 features, got {moments.count}")
        mean = moments.total / moments.count
        covariance = moments.outer / moments.count - np.outer(mean, mean)
        covariance = (covariance + covariance.T) / 2
        with one_blas_thread():
            eigenvalues, vectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues = np.clip(eigenvalues[order], 0.0, None)
        vectors = vectors[:, order]
        signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
        return cls(mean, vectors * np.where(signs == 0, 1.0, signs), eigenvalues, moments.count)

    @property
    def feature_dim(self) -> int:
        return len(self.mean)

    def projection(self, target_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine map that turns raw prior features into standardised targets.

        Args:
            target_dim: D_target of the target network; ``d = min(target_dim, D_prior)``.

        Returns:
            ``(mean [D_prior], weight [D_prior, d])`` float32 tensors with
            ``targets = (features - mean) @ weight``; ``weight`` holds the top-``d``
            eigenvectors divided by the square root of their eigenvalues (columns with
            eigenvalue below ``1e-10 x`` the largest are zero).
        """
        d = min(target_dim, self.feature_dim)
        values = self.eigenvalues[:d]
        floor = RELATIVE_EIGENVALUE_FLOOR * max(self.eigenvalues[0], np.finfo(np.float64).tiny)
        scale = np.where(values > floor, 1.0 / np.sqrt(np.maximum(values, floor)), 0.0)
        weight = self.components[:, :d] * scale[None, :]
        return torch.from_numpy(self.mean.astype(np.float32)), torch.from_numpy(weight.astype(np.float32))

    def targets(self, features: torch.Tensor, target_dim: int) -> torch.Tensor:
        """Standardised ReLA targets: float ``[B, D_prior]`` -> float32 ``[B, min(target_dim, D_prior)]``."""
        mean, weight = self.projection(target_dim)
        return standardised_targets(features, mean.to(features.device), weight.to(features.device))

    def to_bytes(self) -> bytes:
        """Serialise as an ``.npz`` (deterministic bytes for identical statistics)."""
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, components=self.components, eigenvalues=self.eigenvalues, count=self.count)
        return buffer.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> "PCAStatistics":
        """Read statistics written by :meth:`to_bytes`.

        Raises:
            OSError, KeyError: missing file or field.
        """
        with np.load(path) as data:
            return cls(data["mean"], data["components"], data["eigenvalues"], int(data["count"]))
