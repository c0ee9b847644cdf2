"""HDF5 shards (h5py): one ``shard-NNNNNN.h5`` file per shard.

Why one file per shard rather than one file for the whole dataset:

- Resume and atomicity. HDF5 has no journal: a process killed while writing
  can leave the whole file unreadable. A shard file is written under a
  temporary name and renamed when complete, exactly like a tar shard, so a
  killed conversion loses at most the shards in progress and resumes at the
  first unfinished one.
- Many processes. Each rank writes its own shard files; one shared file would
  need parallel HDF5 (MPI) or funnelling every sample through one writer.
- Verification and distribution. Every shard has its own size and SHA-256 in
  ``index.json``, so a corrupt file is named and can be re-fetched alone, and
  the trainer splits the same shard list across nodes and DataLoader workers
  whatever the format.
- One data path. Every format cuts the stored order (the sorted file list in a
  seeded pseudo-random order) into the same fixed ranges; the index lists the
  shard sets side by side.

The price is many files instead of one; at the default 5,000 samples per shard,
ImageNet-1K makes 257 files.

Layout of one file holding ``n`` samples with ``D``-dimensional features (all in
the root group, rows in stored order, so keys are not sorted):

=========  ===========================  =============================================
``key``    int64 ``[n]``                stable sample key
``image``  variable-length uint8 ``[n]``  the ORIGINAL encoded image bytes
``ext``    ASCII, 4 bytes ``[n]``        ``jpg`` / ``png`` / ``webp`` / ``bmp``
``feature`` float32 ``[n, D]``          prior feature; chunked by :data:`BLOCK_ROWS`
                                        rows, optionally gzip or lzf compressed
``label``  int64 ``[n]``                class index, -1 without a class folder
``path``   variable-length bytes ``[n]``  source path relative to SRC (raw bytes)
=========  ===========================  =============================================

File attributes: ``format`` (``"rela-shard"``), ``format_version`` (1) and
``feature_dim``. Files are written without object timestamps and in fixed
blocks of :data:`BLOCK_ROWS` rows, so the same samples give byte-identical files.

Reading costs about 8 us per sample against 108 us for a tar shard
(``benchmarks/loader.py``; it matters for small images such as CIFAR's), and the
features can be read without reading past the images, so HDF5 has the highest
:attr:`HDF5.preference` of the built-in formats: trainers and ``rela select`` read
it when a dataset holds several formats.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import h5py
import numpy as np

from rela_convert.dataset.formats.base import Sample, StorageFormat, finish_shard, register_format
from rela_convert.dataset.index import ShardRecord

if TYPE_CHECKING:
    from rela_convert.config import ConvertOptions

#: Rows per write block and per chunk of every dataset.
BLOCK_ROWS = 256
#: Feature compression filters accepted by :class:`HDF5ShardWriter` (``ConvertOptions.hdf5_compression``).
COMPRESSIONS = ("gzip", "lzf")
FILE_FORMAT = "rela-shard"
IMAGE_DTYPE = h5py.vlen_dtype(np.uint8)
PATH_DTYPE = h5py.string_dtype("ascii")  # bytes in, bytes out: non-UTF-8 names survive
EXT_DTYPE = h5py.string_dtype("ascii", 4)
COLUMNS = ("key", "image", "ext", "feature", "label", "path")


def check_compression(compression: str | None) -> None:
    """Raises ValueError unless ``compression`` is None or one of :data:`COMPRESSIONS`."""
    if compression not in (None, *COMPRESSIONS):
        raise ValueError(f"unknown HDF5 compression {compression!r}; use one of {', '.join(COMPRESSIONS)} or none")


class HDF5ShardWriter:
    """Writes one HDF5 shard to ``<path>.tmp`` and renames it to ``path`` on :meth:`close`.

    Args:
        path: final file path (``.h5``).
        compression: None, ``"gzip"`` or ``"lzf"`` for the feature dataset (images are
            already compressed and are stored as they are).

    Raises:
        ValueError: unknown compression.
        OSError: the output cannot be written.
    """

    def __init__(self, path: Path, compression: str | None = None) -> None:
        check_compression(compression)
        self.path, self.compression = path, compression
        self.temporary = path.with_name(path.name + ".tmp")
        self.file = h5py.File(self.temporary, "w")
        self.pending: list[Sample] = []
        self.count = 0

    def _create(self, feature_dim: int) -> None:
        self.file.attrs.update({"format": FILE_FORMAT, "format_version": 1, "feature_dim": feature_dim})
        common = {"track_times": False}
        for name, dtype in (
            ("key", np.int64),
            ("image", IMAGE_DTYPE),
            ("ext", EXT_DTYPE),
            ("label", np.int64),
            ("path", PATH_DTYPE),
        ):
            self.file.create_dataset(name, (0,), maxshape=(None,), dtype=dtype, chunks=(BLOCK_ROWS,), **common)
        self.file.create_dataset(
            "feature",
            (0, feature_dim),
            maxshape=(None, feature_dim),
            dtype=np.float32,
            chunks=(BLOCK_ROWS, feature_dim),
            compression=self.compression,
            **common,
        )

    def write(self, sample: Sample) -> None:
        """Append one sample (written in blocks of :data:`BLOCK_ROWS`)."""
        self.pending.append(sample)
        if len(self.pending) == BLOCK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        if self.count == 0:
            self._create(len(self.pending[0].feature))
        start, end = self.count, self.count + len(self.pending)
        images = np.empty(len(self.pending), dtype=object)
        images[:] = [np.frombuffer(sample.image, np.uint8) for sample in self.pending]
        columns = {
            "key": np.array([sample.key for sample in self.pending], np.int64),
            "image": images,
            "ext": np.array([sample.ext.encode() for sample in self.pending], "S4"),
            "feature": np.stack([sample.feature for sample in self.pending]).astype(np.float32),
            "label": np.array([-1 if sample.label is None else sample.label for sample in self.pending], np.int64),
            "path": np.array([sample.relpath for sample in self.pending], dtype=object),
        }
        for name, values in columns.items():
            dataset = self.file[name]
            dataset.resize(end, axis=0)
            dataset[start:end] = values
        self.count, self.pending = end, []

    def close(self) -> ShardRecord:
        """Finish the shard: write the last block, fsync, rename into place (:func:`finish_shard`).

        Returns:
            ``{"name", "num_samples", "bytes", "sha256"}`` for ``index.json``.
        """
        self._flush()
        self.file.close()
        return finish_shard(self.temporary, self.path, self.count)

    def abort(self) -> None:
        """Drop the unfinished shard: close the file (errors ignored) and delete the temporary file."""
        with contextlib.suppress(Exception):  # h5py raises several kinds on a full disk
            self.file.close()
        self.temporary.unlink(missing_ok=True)


@register_format("hdf5")
class HDF5(StorageFormat):
    """HDF5 files (h5py), one column per field; features readable without the images."""

    suffix = ".h5"
    preference = 20

    @classmethod
    def check_options(cls, options: ConvertOptions) -> None:
        """Raises ValueError on an unknown ``options.hdf5_compression``."""
        check_compression(options.hdf5_compression)

    @classmethod
    def writer(cls, path: Path, options: ConvertOptions) -> HDF5ShardWriter:
        """An :class:`HDF5ShardWriter` of ``path`` with ``options.hdf5_compression``."""
        return HDF5ShardWriter(path, options.hdf5_compression)

    @classmethod
    def iter_samples(cls, path: str | Path) -> Iterator[dict]:
        """The sample dicts of one HDF5 shard (:meth:`StorageFormat.iter_samples`).

        The file is opened when iteration starts, in the process that iterates (h5py
        handles cannot cross process boundaries), and read in blocks of :data:`BLOCK_ROWS`.

        Raises:
            OSError: missing or unreadable file.
        """
        with h5py.File(path, "r") as file:
            for start in range(0, len(file["key"]), BLOCK_ROWS):
                block = {name: file[name][start : start + BLOCK_ROWS] for name in COLUMNS}
                for row in range(len(block["key"])):
                    yield {
                        "key": int(block["key"][row]),
                        "image": block["image"][row].tobytes(),
                        "ext": block["ext"][row].decode(),
                        "feature": block["feature"][row],
                        "label": int(block["label"][row]),
                        "relpath": block["path"][row],
                    }

    @classmethod
    def read_features(cls, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
        """Keys (int64 ``[n]``) and features (float32 ``[n, D]``) of one HDF5 shard, without reading images.

        Raises:
            OSError: missing or unreadable file.
        """
        with h5py.File(path, "r") as file:
            return file["key"][:], file["feature"][:]
