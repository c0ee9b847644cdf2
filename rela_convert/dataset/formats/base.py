"""What every storage format declares, the registry that finds formats by name, and what formats share.

A storage format is one file in this package: a subclass of :class:`StorageFormat` decorated
with ``@register_format("<name>")``. It declares

- :attr:`~StorageFormat.suffix`: the extension of its shard files (``shard-000007<suffix>``),
- :attr:`~StorageFormat.preference`: which format trainers read when a dataset holds several
  (the highest; :func:`preferred_format`),
- :meth:`~StorageFormat.writer`: writes one shard file from :class:`Sample` objects,
- :meth:`~StorageFormat.iter_samples` and :meth:`~StorageFormat.read_features`: read one back.

Every format stores the same samples in the same order: conversion cuts the stored order into
fixed ranges of ``shard_size`` positions and writes range ``s`` as shard file ``s`` of every
format asked for (:class:`rela_convert.convert.ShardStream`), and ``index.json`` lists each
format's shard records (:class:`rela_convert.dataset.index.ShardRecord`) side by side. A shard file is
written under a temporary name and renamed when complete (:func:`finish_shard`), so a killed
conversion leaves no partial shard under a final name.

Importing this package imports neither torch nor webdataset (formats import heavy libraries
when they read or write), so the CLI can list the formats and ``rela --help`` stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Iterable, Iterator, Protocol

import numpy as np

from rela_convert.dataset.files import sha256_file
from rela_convert.dataset.index import ShardRecord
from rela_convert.registry import Registry

if TYPE_CHECKING:
    from rela_convert.config import ConvertOptions

#: Storage format name -> :class:`StorageFormat` subclass; built-ins live in :mod:`rela_convert.dataset.formats`.
STORAGE_FORMATS: Registry[type[StorageFormat]] = Registry("storage format", "rela_convert.dataset.formats")
register_format = STORAGE_FORMATS.register


@dataclass
class Sample:
    """One converted image, as a shard writer receives it.

    Attributes:
        key: stable integer key (position in the sorted source listing), >= 0.
        image: original encoded bytes.
        ext: container format extension (``jpg``, ``png``, ``webp``, ``bmp``).
        feature: float32 ``[D_prior]`` prior feature.
        label: class index, or None without a class folder.
        relpath: path relative to the source root, raw bytes.
    """

    key: int
    image: bytes
    ext: str
    feature: np.ndarray
    label: int | None
    relpath: bytes


class ShardWriter(Protocol):
    """Writes one shard file (what :meth:`StorageFormat.writer` returns)."""

    def write(self, sample: Sample) -> None:
        """Append one sample (samples arrive in stored order).

        Raises:
            OSError: the file cannot be written.
        """

    def close(self) -> ShardRecord:
        """Finish the file, move it to its final path (:func:`finish_shard`) and describe it.

        Raises:
            OSError: the file cannot be written.
        """

    # Optional: ``abort()``: drop the unfinished shard (its temporary file) without writing anything more, raising
    # nothing; called when the conversion fails (e.g. a full disk). A writer without it leaves its temporary file,
    # which the resumed conversion overwrites.


class StorageFormat:
    """Base class of the storage formats: a writer and readers of one kind of shard file.

    Subclasses set :attr:`suffix` (and :attr:`preference`) and define :meth:`writer` and
    :meth:`iter_samples`; :meth:`read_features` and :meth:`check_options` have defaults.
    Every method is a classmethod: a format holds no state.

    Attributes:
        registered_name: the name the format is registered under (set by the decorator).
        suffix: extension of its shard files, with the dot (``".tar"``).
        preference: the format read when a dataset holds several is the one with the highest
            preference (ties: the first registered); ``hdf5`` is 20, ``webdataset`` 10.
    """

    registered_name: ClassVar[str]
    suffix: ClassVar[str]
    preference: ClassVar[int] = 0

    @classmethod
    def shard_file_name(cls, shard: int) -> str:
        """File name of shard number ``shard`` (0-based), e.g. ``shard-000007.h5``."""
        return f"shard-{shard:06d}{cls.suffix}"

    @classmethod
    def check_options(cls, options: ConvertOptions) -> None:
        """Check the conversion options this format reads, before any work (nothing by default).

        Raises:
            ValueError: an option value this format cannot write.
        """

    @classmethod
    def writer(cls, path: Path, options: ConvertOptions) -> ShardWriter:
        """A writer of the shard file ``path`` (final path; write under a temporary name until closed).

        Args:
            path: ``OUT / shard_file_name(shard)``.
            options: the conversion's options (:class:`rela_convert.config.ConvertOptions`).

        Raises:
            OSError: the file cannot be created.
        """
        raise NotImplementedError

    @classmethod
    def iter_samples(cls, path: str | Path) -> Iterator[dict]:
        """The samples of one shard file, in stored order, as dicts: ``key`` (int), ``image``
        (the original encoded bytes), ``ext`` (``jpg`` / ``png`` / ``webp`` / ``bmp``),
        ``feature`` (float32 ``[D_prior]``), ``label`` (int class index, -1 without a class
        folder) and ``relpath`` (source path relative to SRC, raw bytes). Every format yields
        the same dicts for the same shard.

        Opens the file when iteration starts, so the generator may be created in one process
        and consumed in a DataLoader worker.

        Raises:
            OSError: missing or unreadable file (damaged files may raise other errors too).
        """
        raise NotImplementedError

    @classmethod
    def iter_samples_tolerant(cls, path: str | Path) -> Iterator[dict]:
        """:meth:`iter_samples`, but a sample whose record is damaged comes as ``{"key", "error": reason}``
        instead of ending the shard, where the format can tell one sample's damage from the file's (a record whose
        key cannot be read is left out). What training reads: it replaces such a sample within its batch. By
        default the same as :meth:`iter_samples`.

        Raises:
            OSError, ValueError, ...: the file cannot be opened or read as a whole.
        """
        yield from cls.iter_samples(path)

    @classmethod
    def read_features(cls, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """Keys (int64 ``[n]``) and prior features (float32 ``[n, D]``; ``[0, 0]`` when empty) of
        one shard file, in stored order. By default from :meth:`iter_samples`; formats that can
        read features without reading past the images override it.

        Raises:
            OSError: missing or unreadable file.
        """
        keys, features = [], []
        for sample in cls.iter_samples(path):
            keys.append(sample["key"])
            features.append(sample["feature"])
        return np.asarray(keys, np.int64), np.stack(features) if features else np.zeros((0, 0), np.float32)


def finish_shard(temporary: Path, path: Path, num_samples: int) -> ShardRecord:
    """Make a closed shard file durable and final: fsync ``temporary``, rename it to ``path``, and
    describe it for ``index.json``.

    Returns:
        ``{"name": path.name, "num_samples", "bytes" (file size), "sha256"}``.

    Raises:
        OSError: the file cannot be synced or renamed.
    """
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return {"name": path.name, "num_samples": num_samples, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def preferred_format(formats: Iterable[str]) -> str:
    """The registered format with the highest :attr:`StorageFormat.preference` among ``formats``
    (e.g. the keys of :attr:`rela_convert.dataset.index.DatasetIndex.formats`): the one read when a
    dataset holds several. Ties go to the first registered.

    Raises:
        ValueError: none of ``formats`` is a registered storage format.
    """
    available, names = set(formats), STORAGE_FORMATS.names()
    known = [name for name in names if name in available]
    if not known:
        raise ValueError(f"no known storage format among {sorted(available)}; expected one of {', '.join(names)}")
    return max(known, key=lambda name: STORAGE_FORMATS.get(name).preference)  # max keeps the first of equals
