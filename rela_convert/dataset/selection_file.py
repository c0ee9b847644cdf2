"""``selection.npz``: what the embedding-based subset strategies need, stored next to the shards.

Written by :func:`rela_convert.selection.select` (``rela convert --subset`` or
``rela select``) and read by the trainer's per-epoch draws
(:mod:`rela_convert.dataset.subset`). Numpy only, so reading it needs no faiss.

Arrays (rows aligned with ``keys.npy``, i.e. in shard order):

================  ===================  ==================================================
``keys``          int64 ``[N]``        sample keys (must equal ``keys.npy``)
``cluster``       int32 ``[N]``        spherical k-means cluster of every sample
``similarity``    float32 ``[N]``      cosine similarity to its cluster's centroid (high:
                                       prototypical / easy; low: atypical / hard)
``keep``          bool ``[N]``         False for near-duplicates removed by ``dedup``
``duplicate_of``  int64 ``[N]``        key of the kept image a removed one duplicates, -1
``centroids``     float32 ``[k, d]``   unit-length centroids in the selection feature space
================  ===================  ==================================================

The index's ``subset.selection`` entry names the file, its SHA-256 and the
parameters that produced it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rela_convert.dataset.index import INDEX_NAME, DatasetIndex
from rela_convert.dataset.remote import ContentMismatchError, RemoteFolder, dataset_root, read_small

SELECTION_FILE = "selection.npz"
#: Default sharpness of the ``prototypical`` / ``hard`` draw weights (see :mod:`rela_convert.dataset.subset`).
DEFAULT_SHARPNESS = 3.0


class SelectionError(ValueError):
    """A selection that is missing, stale or does not belong to the dataset; the message says what to run."""


@dataclass(frozen=True)
class Selection:
    """The arrays of ``selection.npz`` (see the module docstring)."""

    keys: np.ndarray
    cluster: np.ndarray
    similarity: np.ndarray
    keep: np.ndarray
    duplicate_of: np.ndarray
    centroids: np.ndarray

    @property
    def num_clusters(self) -> int:
        return len(self.centroids)

    def to_bytes(self) -> bytes:
        """Serialise as ``.npz`` (identical arrays give identical bytes)."""
        buffer = io.BytesIO()
        np.savez(
            buffer,
            keys=self.keys.astype(np.int64),
            cluster=self.cluster.astype(np.int32),
            similarity=self.similarity.astype(np.float32),
            keep=self.keep.astype(bool),
            duplicate_of=self.duplicate_of.astype(np.int64),
            centroids=self.centroids.astype(np.float32),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Selection":
        with np.load(io.BytesIO(data)) as arrays:
            return cls(
                *(arrays[name] for name in ("keys", "cluster", "similarity", "keep", "duplicate_of", "centroids"))
            )


def load_selection(root: str | Path | Any, index: DatasetIndex, keys: np.ndarray | None = None) -> Selection:
    """Read and check the selection recorded in a dataset's index.

    Args:
        root: converted dataset folder, or its URL / :class:`~rela_convert.dataset.remote.RemoteFolder` (the file is
            fetched and checked against its SHA-256, once more on a mismatch).
        index: its index (:attr:`~DatasetIndex.subset` names the selection).
        keys: the dataset's keys (int64 ``[N]``, ``keys.npy``); read from ``root`` when None.

    Returns:
        The checked :class:`Selection` (rows aligned with ``keys``).

    Raises:
        SelectionError: no selection recorded (run ``rela select``), the file is missing,
            its SHA-256 differs from the index (changed since, e.g. by a concurrent
            ``rela select``: read again), or its keys are not the dataset's.
        OSError: (URL) :class:`~rela_convert.dataset.remote.RemoteError`: the server keeps failing.
    """
    entry = index.subset.get("selection")
    if not entry:
        raise SelectionError(
            f"{root} has no selection (cluster ids, scores, duplicates); compute one with: rela select {root} --subset "
            "STRATEGY"
        )
    root = dataset_root(root)
    path = root / entry["file"]  # a Path, or a URL
    mismatch = SelectionError(
        f"{path} does not match the SHA-256 in {root / INDEX_NAME} (rewritten since the index was read?); "
        "read the dataset again or rerun rela select"
    )
    if isinstance(root, RemoteFolder):
        try:
            data = root.read_bytes(entry["file"], entry["sha256"])  # a mismatch is fetched once more
        except FileNotFoundError:
            raise SelectionError(
                f"{path} is missing; recompute it with: rela select {root} --subset STRATEGY"
            ) from None
        except ContentMismatchError:
            raise mismatch from None
    else:
        if not path.is_file():
            raise SelectionError(f"{path} is missing; recompute it with: rela select {root} --subset STRATEGY")
        data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise mismatch
    selection = Selection.from_bytes(data)
    keys = np.load(read_small(root, index.keys_file, index.keys_sha256)) if keys is None else keys
    if not np.array_equal(selection.keys, keys):
        raise SelectionError(f"{path} was computed for other samples than {root}/{index.keys_file}; rerun rela select")
    return selection
