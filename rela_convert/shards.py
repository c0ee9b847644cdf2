"""Shard files: WebDataset tar archives of samples (image bytes + prior feature).

One sample is stored as the tar members ``<key>.<ext>`` (the ORIGINAL encoded
image bytes, ``ext`` one of jpg/png/webp/bmp), ``<key>.prior.npy`` (float32
``[D_prior]`` feature), ``<key>.path`` (relative source path, raw bytes) and,
when the tree has class folders, ``<key>.cls`` (class index as decimal text).
Members carry a fixed mtime, owner and mode, so the same samples always give
byte-identical shards. Shards are written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

from rela_convert.hashing import sha256_file

KEY_DIGITS = 9
FEATURE_FIELD = "prior.npy"


def format_key(key: int) -> str:
    """Integer key -> the zero-padded ``__key__`` string of a shard member."""
    return f"{key:0{KEY_DIGITS}d}"


@dataclass
class Sample:
    """One converted image.

    Attributes:
        key: stable integer key (position in the sorted source listing).
        image: original encoded bytes.
        ext: container format extension (``jpg``, ``png``, ``webp``, ``bmp``).
        feature: float32 ``[D_prior]`` prior feature.
        label: class index or None.
        relpath: path relative to the source root, raw bytes.
    """

    key: int
    image: bytes
    ext: str
    feature: np.ndarray
    label: int | None
    relpath: bytes


def encode_feature(feature: np.ndarray) -> bytes:
    """float32 ``[D]`` -> ``.npy`` bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(feature, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


#: Bytes before the header dict of a ``.npy`` file of format version 1.0: magic, version, header length.
NPY_V1_PREAMBLE = 10


@functools.lru_cache(maxsize=16)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...]]:
    """dtype and shape of a version 1.0 ``.npy`` header (preamble and dict); raises ValueError otherwise."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version != (1, 0):
        raise ValueError(f"feature stored as .npy format {version}, expected (1, 0)")
    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    if fortran_order or len(shape) != 1:
        raise ValueError(f"feature stored with shape {shape}, expected one C-order row")
    return dtype, shape


def decode_feature(data: bytes) -> np.ndarray:
    """``.npy`` bytes written by :func:`encode_feature` -> float32 ``[D]`` (a writable copy).

    Every feature of a dataset has the same header, so it is parsed once and
    cached: about 2 us per sample instead of ``np.load``'s 28 us, which matters
    to the training reader at 32 px (``benchmarks/loader.py``).

    Raises:
        ValueError: not a version 1.0 ``.npy`` of one C-order row (e.g. damaged bytes).
    """
    header_length = NPY_V1_PREAMBLE + int.from_bytes(data[8:10], "little")
    dtype, shape = _npy_header(bytes(data[:header_length]))
    return np.frombuffer(data, dtype, count=shape[0], offset=header_length).astype(np.float32)


class WebDatasetShardWriter:
    """Writes one tar shard to ``<path>.tmp`` and renames it to ``path`` on :meth:`close`.

    Raises:
        OSError: the output cannot be written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temporary = path.with_name(path.name + ".tmp")
        self.stream = open(self.temporary, "wb")
        self.writer = wds.TarWriter(
            self.stream, user="rela", group="rela", mode=0o444, mtime=0, encoder=False
        )  # an int: a float mtime costs a pax header per member
        self.count = 0

    def write(self, sample: Sample) -> None:
        """Append one sample."""
        record = {
            "__key__": format_key(sample.key),
            sample.ext: sample.image,
            FEATURE_FIELD: encode_feature(sample.feature),
            "path": sample.relpath,
        }
        if sample.label is not None:
            record["cls"] = str(sample.label).encode()
        self.writer.write(record)
        self.count += 1

    def close(self) -> dict:
        """Finish the shard: flush, fsync, rename into place.

        Returns:
            ``{"name", "num_samples", "bytes", "sha256"}`` for ``index.json``.
        """
        self.writer.close()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        os.replace(self.temporary, self.path)
        return {
            "name": self.path.name,
            "num_samples": self.count,
            "bytes": self.path.stat().st_size,
            "sha256": sha256_file(self.path),
        }


def iter_shard(path: str | Path) -> Iterator[dict]:
    """Yield the raw members of a tar shard grouped per sample, in stored order:
    dicts with ``__key__`` and one bytes value per member suffix (the whole shard,
    whichever rank or DataLoader worker reads it)."""
    # A bare pipeline: wds.WebDataset would add its default node and worker splitters,
    # which drop the shard in all but one DataLoader worker or rank.
    yield from wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())


def read_features(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Keys (int64 ``[n]``) and prior features (float32 ``[n, D]``) of one shard, in stored order."""
    keys, features = [], []
    for record in iter_shard(path):
        keys.append(int(record["__key__"]))
        features.append(decode_feature(record[FEATURE_FIELD]))
    return np.asarray(keys, np.int64), np.stack(features) if features else np.zeros((0, 0), np.float32)
