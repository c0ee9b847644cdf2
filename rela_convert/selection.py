"""Embedding-based subset strategies, computed from a converted dataset's stored prior features.

method.md step 3 (Sun, Jiang, Lin, NeurIPS 2024) draws every epoch's ``floor(r*N)``
images uniformly at random; that stays the default (``random``). The prior's
features, which conversion already stored, also allow (this project's own
addition, to be measured against ``random``, not assumed better):

- ``dedup``: SemDeDup (Abbas et al., 2023): near-duplicates inside k-means
  clusters are removed (:mod:`rela_convert.dedup`); epochs draw uniformly from
  the remaining pool.
- ``balanced``: epochs spread their budget evenly across k-means clusters.
- ``prototypical`` / ``hard``: epochs draw with weights favouring images close
  to / far from their cluster's centroid (the self-supervised prototype metric
  of Sorscher et al., NeurIPS 2022).

The per-epoch draw rules live in :mod:`rela_convert.dataset.subset`; this module computes
what they need, once, and stores it as ``selection.npz`` (:mod:`rela_convert.dataset.selection_file`)
with a description in ``index.json``. :func:`select` runs after the PCA fit of a
conversion (``rela convert --subset``) or on an existing dataset
(``rela select``): it reads only the stored features, never the prior, and
never touches the shards. A dataset at a writable URL (``s3://``, ...:
:mod:`rela_convert.dataset.remote`) is read shard by shard (checked copies) and gets
``selection.npz`` then ``index.json`` written back.

Feature space: each shard's features are streamed, centred with the PCA mean
and projected onto the top ``dim`` principal components of ``pca.npz``
(default ``min(D, 512)``; a rotation when ``dim = D``, so cosines of centred
features are unchanged), then L2-normalised. Centring matters: pooled ReLU
features all point into one orthant, so raw cosines between unrelated images
are high. Only the projected ``[N, dim]`` float32 array is held (2.6 GB for
ImageNet-1K at ``dim = 512``), plus one shard of raw features at a time.

Computation: spherical k-means on a capped sample, exact assignment of every
image (:mod:`rela_convert.clustering`), then the per-cluster near-duplicate
search. The whole selection is computed for every non-random strategy, so
``rela train --subset`` can switch between them without recomputing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rela_convert import clustering
from rela_convert.config import DEFAULT_DIM, SelectionOptions
from rela_convert.dataset.formats import STORAGE_FORMATS, preferred_format
from rela_convert.dataset.index import DatasetIndex
from rela_convert.dataset.pca import PCAStatistics
from rela_convert.dataset.remote import RemoteFolder, dataset_root, read_small, shard_file, write_file
from rela_convert.dataset.selection_file import SELECTION_FILE, Selection
from rela_convert.dedup import deduplicate
from rela_convert.options import check

#: Removing more than this fraction as near-duplicates earns a warning (eps too large for the prior?).
SUSPICIOUS_REMOVAL = 0.2


@dataclass(frozen=True)
class SelectionSpace:
    """The map from raw prior features to the selection space: centre with the PCA mean,
    project on the top ``dim`` components, L2-normalise.

    Attributes:
        mean: float32 ``[D]``.
        weight: float32 ``[D, dim]`` (eigenvectors, largest eigenvalue first; not whitened).
        explained_variance: fraction of the feature variance the ``dim`` components hold.
    """

    mean: np.ndarray
    weight: np.ndarray
    explained_variance: float

    @classmethod
    def from_pca(cls, pca: PCAStatistics, dim: int | None = DEFAULT_DIM) -> "SelectionSpace":
        """``dim`` None or 0, or above ``D``: all ``D`` components (a rotation)."""
        dim = min(dim or pca.feature_dim, pca.feature_dim)
        total = float(pca.eigenvalues.sum())
        explained = float(pca.eigenvalues[:dim].sum() / total) if total > 0 else 1.0
        return cls(
            pca.mean.astype(np.float32), np.ascontiguousarray(pca.components[:, :dim], dtype=np.float32), explained
        )

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def project(self, raw: np.ndarray) -> np.ndarray:
        """float ``[n, D]`` -> float32 ``[n, dim]``, rows L2-normalised."""
        return clustering.l2_normalise((np.asarray(raw, np.float32) - self.mean) @ self.weight)


def projected_features(
    root: str | Path | RemoteFolder,
    index: DatasetIndex,
    dim: int | None = DEFAULT_DIM,
    storage: str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Stream every shard's features into the selection space (see the module docstring).

    Args:
        root: converted dataset folder, or its URL.
        index: its index.
        dim: principal components kept (None or 0: all ``D``).
        storage: format to read; None: the preferred one it holds
            (:func:`~rela_convert.dataset.formats.preferred_format`: ``hdf5`` when present).

    Returns:
        ``(keys int64 [N], features float32 [N, dim] L2-normalised, explained variance fraction)``.

    Raises:
        ValueError: the dataset has no PCA statistics (fewer than 2 samples), no ``storage`` shards, or
            ``storage`` is not a registered format (:class:`~rela_convert.registry.RegistryError`).
        OSError: a shard cannot be read (:class:`~rela_convert.dataset.remote.RemoteError` at a URL, after the retries).
        rela_convert.dataset.remote.ContentMismatchError: (URL) a file differs from its SHA-256 in the index twice.
    """
    root = dataset_root(root)
    if index.pca is None:
        raise ValueError(f"{root} has no PCA statistics (fewer than 2 samples): nothing to select from")
    storage = storage or preferred_format(index.formats)
    try:
        shards = index.shards(storage)
    except ValueError as error:
        raise ValueError(f"{root}: {error}") from None
    format = STORAGE_FORMATS.get(storage)
    space = SelectionSpace.from_pca(PCAStatistics.load(read_small(root, index.pca["file"], index.pca["sha256"])), dim)
    features = np.empty((index.num_samples, space.dim), np.float32)
    keys = np.empty(index.num_samples, np.int64)
    row = 0
    for shard in tqdm(shards, desc="read features", unit="shard", disable=not progress):
        with shard_file(root, shard) as (path, _):  # at a URL: a checked copy (shard cache or temporary file)
            shard_keys, raw = format.read_features(path)
        features[row : row + len(raw)] = space.project(raw)
        keys[row : row + len(raw)] = shard_keys
        row += len(raw)
    if row != len(keys):
        raise ValueError(f"{root}: the {storage} shards hold {row} samples, the index says {len(keys)}")
    return keys, features, space.explained_variance


def compute_selection(
    keys: np.ndarray, features: np.ndarray, options: SelectionOptions = SelectionOptions()
) -> tuple[Selection, dict]:
    """k-means, scores and near-duplicates of features already in the selection space.

    Args:
        keys: int64 ``[N]``.
        features: float32 ``[N, d]``, L2-normalised, rows aligned with ``keys``.

    Returns:
        ``(selection, info)``; ``info`` holds ``kmeans`` and ``dedup`` descriptions
        for the index and ``seconds`` per stage (``kmeans``, ``dedup``).
    """
    check(options)
    k = options.num_clusters or clustering.default_num_clusters(len(keys))
    started = time.perf_counter()
    result = clustering.spherical_kmeans(features, k, options.niter, options.seed, options.max_points_per_centroid)
    kmeans_seconds = time.perf_counter() - started
    started = time.perf_counter()
    dedup = deduplicate(features, result.cluster, keys, options.eps)
    dedup_seconds = time.perf_counter() - started
    duplicate_of = np.where(dedup.duplicate_of >= 0, keys[np.maximum(dedup.duplicate_of, 0)], -1)
    selection = Selection(keys, result.cluster, result.similarity, dedup.keep, duplicate_of, result.centroids)
    sizes = np.bincount(result.cluster, minlength=len(result.centroids))
    info = {
        "kmeans": {
            "num_clusters": int(len(result.centroids)),
            "non_empty_clusters": int((sizes > 0).sum()),
            "largest_cluster": int(sizes.max()),
            "smallest_non_empty_cluster": int(sizes[sizes > 0].min()),
            "niter": options.niter,
            "seed": options.seed,
            "train_points": result.train_points,
            "max_points_per_centroid": options.max_points_per_centroid,
            "spherical": True,
            "mean_similarity_to_centroid": float(result.similarity.mean()),
            "gpus": result.gpus,
        },
        "dedup": {
            "eps": options.eps,
            "threshold": "cosine similarity > 1 - eps, within a cluster, to an earlier kept image",
            "keep_rule": "first (lowest key) image of each near-duplicate group",
            "num_duplicates": dedup.num_removed,
            "pool": int(dedup.keep.sum()),
            "similar_pairs": dedup.similar_pairs,
        },
        "seconds": {
            "kmeans": kmeans_seconds,
            "kmeans_train": result.seconds["train"],
            "kmeans_assign": result.seconds["assign"],
            "dedup": dedup_seconds,
        },
    }
    return selection, info


def select(
    root: str | Path | RemoteFolder,
    strategy: str,
    options: SelectionOptions = SelectionOptions(),
    progress: bool = False,
) -> dict:
    """Record ``strategy`` as the dataset's default subset, computing its selection in place.

    For every strategy that needs the selection (all built-ins but ``random``), streams
    the stored features, computes the selection and writes ``selection.npz`` then
    ``index.json``, each atomically (temporary file, fsync, rename); shards, ``keys.npy``
    and ``pca.npz`` are not touched and the prior is not run. A strategy without
    ``needs_selection`` (``random``) only records the strategy (an existing selection
    stays, so ``rela train --subset`` can still use it).

    Args:
        root: converted dataset folder, or its URL (not HTTP: read-only).
        strategy: a name in :data:`rela_convert.dataset.subset.SUBSET_STRATEGIES`.
        options: :class:`SelectionOptions`.

    Returns:
        The new ``subset`` entry of the index, plus ``"seconds"`` (per stage and
        ``total``; not stored in the index).

    Raises:
        rela_convert.dataset.files.DatasetError: not a converted dataset.
        ValueError: unknown strategy, bad options, or no features to select from.
        OSError: a file cannot be read or written (:class:`~rela_convert.dataset.remote.RemoteError` for a read-only
            URL, before any work, or a server that keeps failing).
    """
    from rela_convert.dataset.subset import SUBSET_STRATEGIES

    needs_selection = SUBSET_STRATEGIES.get(strategy).needs_selection  # unknown: RegistryError (a ValueError)
    check(options)
    root = dataset_root(root)
    if isinstance(root, RemoteFolder):
        root.check_writable()  # before any work: selection.npz and index.json are written back
    started = time.perf_counter()
    index = DatasetIndex.load(root)
    subset = {
        key: value for key, value in index.subset.items() if key in ("data_ratio", "seed", "selection", "sharpness")
    }
    subset["strategy"] = strategy
    seconds = {}
    if needs_selection:
        read_started = time.perf_counter()
        keys, features, explained = projected_features(root, index, options.dim, options.storage, progress)
        seconds["read"] = time.perf_counter() - read_started
        if not np.array_equal(keys, np.load(read_small(root, index.keys_file, index.keys_sha256))):
            raise ValueError(f"{root}: the shards' keys differ from {index.keys_file}; run rela inspect --verify")
        selection, info = compute_selection(keys, features, options)
        seconds.update(info.pop("seconds"))
        data = selection.to_bytes()
        write_file(root, SELECTION_FILE, data)  # before the index that names it
        subset["sharpness"] = options.sharpness
        subset["selection"] = {
            "file": SELECTION_FILE,
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "features": {
                "source": options.storage or preferred_format(index.formats),
                "dim": int(features.shape[1]),
                "explained_variance": explained,
                "space": (
                    "prior features centred with pca.npz's mean, projected on its top-dim components, L2-normalised"
                ),
            },
            **info,
            "scores": "similarity: cosine to the nearest centroid (prototypical: high, hard: low)",
        }
    index.subset = subset
    index.save(root)
    seconds["total"] = time.perf_counter() - started
    return {**subset, "seconds": seconds}


def selection_summary(subset: dict) -> str:
    """One line describing a ``subset`` entry, for the command line."""
    line = f"default subset {subset['strategy']} (data ratio {subset['data_ratio']}, seed {subset['seed']})"
    entry = subset.get("selection")
    if not entry:
        return line
    kmeans, dedup = entry["kmeans"], entry["dedup"]
    line += (
        f"; selection: {kmeans['num_clusters']} clusters of {entry['features']['dim']}-d features "
        f"({100 * entry['features']['explained_variance']:.1f}% of the variance), "
        f"{dedup['num_duplicates']} near-duplicates at eps {dedup['eps']} (pool {dedup['pool']})"
    )
    total = dedup["num_duplicates"] + dedup["pool"]
    if total and dedup["num_duplicates"] > SUSPICIOUS_REMOVAL * total:
        line += (
            f"\nwarning: {100 * dedup['num_duplicates'] / total:.0f}% of the images are near-duplicates at eps "
            f"{dedup['eps']}: the prior's features may be too coarse to tell near-copies from similar images; try a "
            "smaller --dedup-eps"
        )
    return line
