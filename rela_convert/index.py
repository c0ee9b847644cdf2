"""``index.json``: the description of a converted dataset, and atomic JSON writes.

Fields of ``index.json`` (written last, by :func:`rela_convert.convert.convert`):

- ``format`` (``"rela-converted"``), ``format_version`` (2: samples stored in a seeded
  pseudo-random order; version 1 stored them in key order).
- ``num_samples``, ``num_skipped`` (entries of ``skipped_file``), ``classes``
  (first-level folder names; a sample's label indexes this list).
- ``storage``: the format ``shards`` lists (``webdataset`` when written, else ``hdf5``);
  ``shards``: ``[{name, num_samples, bytes, sha256}]`` in stored order: the shards are
  consecutive slices of ``keys_file``; ``formats``: ``{format: shard list}`` for every
  format written (same samples in the same order).
- ``order``: ``{seed, rule}``: stored position ``p`` of the sorted listing's ``num_files``
  files holds key ``numpy.random.default_rng(seed).permutation(num_files)[p]`` (skipped
  files leave gaps), so keys inside a shard are not sorted.
- ``feature_dim``, ``feature_dtype`` (``float32``); ``prior``: spec, input size,
  normalisation, weights file and its SHA-256, seed, resize rule.
- ``keys_file`` (``keys.npy``, int64 keys in stored (shard) order) and ``keys_sha256``;
  a key is the sample's position in the sorted source listing.
- ``pca``: ``{file, count, sha256}`` of the PCA statistics (absent below 2 samples).
- ``image_sizes``: ``{shorter_side_min, shorter_side_median, shorter_side_max}``, ints in
  pixels, over the source images of all samples (the median is the lower median);
  :func:`default_train_size` derives the training input size from it.
- ``skipped_file`` (``skipped.jsonl``: one ``{"path", "reason"}`` per file not converted).
- ``subset``: default ``strategy``, ``data_ratio`` and ``seed`` of the per-epoch draws.
- ``job``: what a re-run must match to resume or reuse the output (source folder,
  listing hash, prior and weights hash, shard size, formats, HDF5 compression, decoder,
  order seed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

INDEX_NAME = "index.json"
FORMAT_NAME = "rela-converted"
FORMAT_VERSION = 2
#: The usual ImageNet training crop, pixels: the largest default training input size.
MAX_DEFAULT_TRAIN_SIZE = 224


class DatasetError(ValueError):
    """A converted dataset that cannot be used (missing or incompatible index)."""


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, and rename.

    Raises:
        OSError: the file cannot be written.
    """
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_json_atomic(path: Path, value: dict) -> None:
    """Write ``value`` as indented, key-sorted JSON (deterministic bytes), atomically."""
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def load_index(root: str | Path) -> dict:
    """Read ``root/index.json`` of a converted dataset.

    Raises:
        DatasetError: no index (not a converted dataset, or an unfinished
            conversion) or an unsupported format version.
    """
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise DatasetError(
            f"{root} has no {INDEX_NAME}: not a converted dataset, or its conversion has not finished (run rela "
            "convert again to resume)"
        )
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT_NAME or index.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path} is format {index.get('format')!r} v{index.get('format_version')}; "
            f"this rela reads {FORMAT_NAME!r} v{FORMAT_VERSION}: convert it again with this rela"
        )
    return index


def default_train_size(index: dict) -> int:
    """The default training input size S of a converted dataset, pixels:
    ``min(224, median shorter side of its source images)`` (``index["image_sizes"]``).

    The training input size is the data's: 32 for CIFAR, 64 for Tiny-ImageNet, 224 for
    ImageNet (method.md, stage 2), never the prior's input size, which only sets the view
    the prior sees at conversion. 224 is the usual ImageNet training crop, so larger
    images are trained at 224.
    """
    return min(MAX_DEFAULT_TRAIN_SIZE, int(index["image_sizes"]["shorter_side_median"]))
