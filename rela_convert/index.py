"""``index.json``: the description of a converted dataset, and atomic JSON writes.

Fields of ``index.json`` (written last, by :func:`rela_convert.convert.convert`):

- ``format`` (``"rela-converted"``), ``format_version`` (1).
- ``num_samples``, ``num_skipped`` (entries of ``skipped_file``), ``classes``
  (first-level folder names; a sample's label indexes this list).
- ``storage``: the format ``shards`` lists (``webdataset`` when written, else ``hdf5``);
  ``shards``: ``[{name, num_samples, bytes, sha256, first_key, last_key}]`` in key order;
  ``formats``: ``{format: shard list}`` for every format written (same ranges).
- ``feature_dim``, ``feature_dtype`` (``float32``); ``prior``: spec, input size,
  normalisation, weights file and its SHA-256, seed, resize rule.
- ``keys_file`` (``keys.npy``, int64 keys in shard order) and ``keys_sha256``;
  ``pca``: ``{file, count, sha256}`` of the PCA statistics (absent below 2 samples).
- ``skipped_file`` (``skipped.jsonl``: one ``{"path", "reason"}`` per file not converted).
- ``subset``: default ``strategy``, ``data_ratio`` and ``seed`` of the per-epoch draws.
- ``job``: what a re-run must match to resume or reuse the output (source folder,
  listing hash, prior and weights hash, shard size, formats, HDF5 compression).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

INDEX_NAME = "index.json"
FORMAT_NAME = "rela-converted"
FORMAT_VERSION = 1


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
        raise DatasetError(f"{root} has no {INDEX_NAME}: not a converted dataset, or its conversion has not finished (run rela convert again to resume)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT_NAME or index.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path} is format {index.get('format')!r} v{index.get('format_version')}; this rela reads {FORMAT_NAME!r} v{FORMAT_VERSION}")
    return index
