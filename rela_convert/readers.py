"""Reading converted shards of either storage format as one stream of sample dicts.

A sample dict holds ``key`` (int), ``image`` (the original encoded bytes), ``ext``
(``jpg`` / ``png`` / ``webp`` / ``bmp``), ``feature`` (float32 ``[D_prior]``),
``label`` (class index, -1 when the source tree had no class folder) and
``relpath`` (source path relative to SRC, raw bytes). Both formats yield the
same dicts in the same order for the same shard range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from rela_convert.hdf5 import iter_hdf5_shard, read_hdf5_features
from rela_convert.images import STORED_FORMATS
from rela_convert.shards import FEATURE_FIELD, decode_feature, iter_shard
from rela_convert.shards import read_features as read_tar_features

#: Storage formats, in the order of preference for ``index["storage"]`` (the format trainers
#: read by default) when several are written: HDF5 first, because its reader costs about 8 us
#: per sample against 108 us for a tar shard, whose four members each cost Python's tarfile a
#: header parse (``benchmarks/loader.py``; it matters for small images such as CIFAR's).
FORMATS = ("hdf5", "webdataset")
SUFFIXES = {"webdataset": ".tar", "hdf5": ".h5"}
IMAGE_FIELDS = tuple(STORED_FORMATS.values())


def preferred_format(formats: Iterable[str]) -> str:
    """The first of :data:`FORMATS` among ``formats`` (e.g. the keys of ``index["formats"]``):
    the format read when a dataset holds several.

    Raises:
        ValueError: none of ``formats`` is a known storage format.
    """
    available = set(formats)
    for format in FORMATS:
        if format in available:
            return format
    raise ValueError(f"no known storage format among {sorted(available)}; expected one of {', '.join(FORMATS)}")


def shard_file_name(shard: int, format: str) -> str:
    """File name of shard number ``shard`` (0-based) in ``format``, e.g. ``shard-000007.h5``."""
    return f"shard-{shard:06d}{SUFFIXES[format]}"


def _iter_tar_shard(path: str | Path) -> Iterator[dict]:
    for record in iter_shard(path):
        ext = next(field for field in IMAGE_FIELDS if field in record)
        yield {
            "key": int(record["__key__"]),
            "image": record[ext],
            "ext": ext,
            "feature": decode_feature(record[FEATURE_FIELD]),
            "label": int(record["cls"]) if "cls" in record else -1,
            "relpath": record["path"],
        }


SHARD_READERS: dict[str, Callable[[str | Path], Iterator[dict]]] = {
    "webdataset": _iter_tar_shard,
    "hdf5": iter_hdf5_shard,
}
FEATURE_READERS: dict[str, Callable[[str | Path], tuple[np.ndarray, np.ndarray]]] = {
    "webdataset": read_tar_features,
    "hdf5": read_hdf5_features,
}


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown storage format {format!r}; use one of {', '.join(FORMATS)}")


def iter_shard_samples(path: str | Path, format: str) -> Iterator[dict]:
    """Sample dicts of one shard file, in stored order (a seeded pseudo-random order of the keys).

    Files are opened lazily, when iteration starts, so the generator may be
    created in one process and consumed in a DataLoader worker.

    Raises:
        ValueError: unknown format.
        OSError: missing or unreadable shard.
    """
    _check_format(format)
    return SHARD_READERS[format](path)


def iter_samples(root: str | Path, shard_names: Iterable[str], format: str) -> Iterator[dict]:
    """Sample dicts of the named shards of the dataset at ``root``, shard after shard.

    Args:
        root: converted dataset folder.
        shard_names: ``name`` fields of ``index["formats"][format]`` (any subset or
            order, e.g. the share of one rank and worker).
        format: ``"webdataset"`` or ``"hdf5"``.

    Raises:
        ValueError: unknown format.
        OSError: missing or unreadable shard.
    """
    _check_format(format)
    for name in shard_names:
        yield from SHARD_READERS[format](Path(root) / name)


def read_features(path: str | Path, format: str) -> tuple[np.ndarray, np.ndarray]:
    """Keys (int64 ``[n]``) and prior features (float32 ``[n, D]``) of one shard, in stored order.

    Raises:
        ValueError: unknown format.
        OSError: missing or unreadable shard.
    """
    _check_format(format)
    return FEATURE_READERS[format](path)
