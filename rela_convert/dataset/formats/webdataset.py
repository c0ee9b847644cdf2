"""WebDataset tar shards (``shard-NNNNNN.tar``), the default storage format.

One sample is stored as the tar members ``<key>.<ext>`` (the ORIGINAL encoded
image bytes, ``ext`` one of jpg/png/webp/bmp), ``<key>.prior.npy`` (float32
``[D_prior]`` feature), ``<key>.path`` (relative source path, raw bytes) and,
when the tree has class folders, ``<key>.cls`` (class index as decimal text);
``<key>`` is the key zero-padded to :data:`KEY_DIGITS` digits. Members carry a
fixed mtime, owner and mode, so the same samples always give byte-identical
shards.

Reading a tar shard costs about 108 us per sample against 8 us for an HDF5 shard
(each of the four members costs Python's tarfile a header parse;
``benchmarks/loader.py``), so its :attr:`WebDataset.preference` is below HDF5's.

Shards are read with :mod:`tarfile` (:func:`iter_records`: a damaged member header costs that member
alone); the ``webdataset`` library (which imports torch) is imported when a shard is written, not with this
module.
"""

from __future__ import annotations

import contextlib
import functools
import io
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from rela_convert.dataset.formats.base import Sample, StorageFormat, finish_shard, register_format
from rela_convert.dataset.index import ShardRecord

if TYPE_CHECKING:
    from rela_convert.config import ConvertOptions

KEY_DIGITS = 9
FEATURE_FIELD = "prior.npy"
#: Bytes before the header dict of a ``.npy`` file of format version 1.0: magic, version, header length.
NPY_V1_PREAMBLE = 10


def format_key(key: int) -> str:
    """Integer key (>= 0) -> the zero-padded ``__key__`` string of a shard member (:data:`KEY_DIGITS` digits)."""
    return f"{key:0{KEY_DIGITS}d}"


def encode_feature(feature: np.ndarray) -> bytes:
    """float32 ``[D]`` (other float dtypes are cast) -> ``.npy`` bytes (format version 1.0)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(feature, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


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


class TarShardWriter:
    """Writes one tar shard to ``<path>.tmp`` and renames it to ``path`` on :meth:`close`.

    Raises:
        OSError: the output cannot be written.
    """

    def __init__(self, path: Path) -> None:
        import webdataset as wds

        self.path = path
        self.temporary = path.with_name(path.name + ".tmp")
        self.stream = open(self.temporary, "wb")
        self.writer = wds.TarWriter(
            self.stream, user="rela", group="rela", mode=0o444, mtime=0, encoder=False
        )  # an int: a float mtime costs a pax header per member
        self.count = 0

    def write(self, sample: Sample) -> None:
        """Append one sample (its members, see the module docstring)."""
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

    def close(self) -> ShardRecord:
        """Finish the shard: end the archive, fsync, rename into place (:func:`finish_shard`).

        Returns:
            ``{"name", "num_samples", "bytes", "sha256"}`` for ``index.json``.
        """
        self.writer.close()
        self.stream.close()
        return finish_shard(self.temporary, self.path, self.count)

    def abort(self) -> None:
        """Drop the unfinished shard: nothing more is written (the tar stream's buffer and end blocks are discarded,
        so that a full disk raises nothing, not even when the writer is collected), the temporary file is deleted."""
        self.writer.tarstream.fileobj.closed = True  # tarfile's stream would flush its buffer when collected
        with contextlib.suppress(OSError):
            self.stream.close()  # closed even when its last flush fails
        self.temporary.unlink(missing_ok=True)


def iter_records(path: str | Path) -> Iterator[dict]:
    """The raw members of a tar shard grouped per sample, in stored order: dicts with
    ``__key__`` and one bytes value per member suffix (the whole shard, whichever rank or
    DataLoader worker reads it).

    A damaged member header (its checksum does not match) costs that member alone: the reader goes on at the next
    512-byte block that is a valid header (``tarfile``'s ``ignore_zeros``), so the member's sample comes without it
    and every later sample is read as stored. (The streaming reader of ``webdataset`` ends the shard at such a
    header, losing every later sample of it.)

    Raises:
        OSError: missing or unreadable file.
        tarfile.ReadError: the file ends inside a member (a truncated shard).
    """
    record: dict = {}
    with open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|", ignore_zeros=True) as archive:
        for member in archive:
            if not member.isreg():
                continue
            key, _, suffix = member.name.partition(".")
            if record and key != record["__key__"]:
                yield record
                record = {}
            record["__key__"] = key
            record[suffix] = archive.extractfile(member).read()
            archive.members = []  # the streaming reader keeps every member read otherwise
    if record:
        yield record


def sample_from_record(record: dict) -> dict:
    """One record of :func:`iter_records` -> the sample dict of :meth:`StorageFormat.iter_samples`
    (``key``, ``image``, ``ext``, ``feature`` float32 ``[D]``, ``label``, ``relpath``).

    Raises:
        ValueError: a damaged record: an unparsable key or class, a member missing (image, feature or path), or a
            damaged feature member.
    """
    from rela_convert.images import STORED_FORMATS  # imports torch: not at module import

    ext = next((field for field in STORED_FORMATS.values() if field in record), None)
    if ext is None:
        raise ValueError(f"sample {record.get('__key__')!r} has no image member")
    missing = [field for field in (FEATURE_FIELD, "path") if field not in record]
    if missing:
        raise ValueError(f"sample {record.get('__key__')!r} has no {missing[0]} member")
    return {
        "key": int(record["__key__"]),
        "image": record[ext],
        "ext": ext,
        "feature": decode_feature(record[FEATURE_FIELD]),
        "label": int(record["cls"]) if "cls" in record else -1,
        "relpath": record["path"],
    }


@register_format("webdataset")
class WebDataset(StorageFormat):
    """WebDataset tar files, one member per field of a sample; readable by any tar or WebDataset tool."""

    suffix = ".tar"
    preference = 10

    @classmethod
    def writer(cls, path: Path, options: ConvertOptions) -> TarShardWriter:
        """A :class:`TarShardWriter` of ``path`` (no option applies)."""
        return TarShardWriter(path)

    @classmethod
    def iter_samples(cls, path: str | Path) -> Iterator[dict]:
        """The sample dicts of one tar shard (:meth:`StorageFormat.iter_samples`).

        Raises:
            OSError: missing or unreadable file.
            ValueError: a damaged feature member.
        """
        for record in iter_records(path):
            yield sample_from_record(record)

    @classmethod
    def iter_samples_tolerant(cls, path: str | Path) -> Iterator[dict]:
        """The sample dicts of one tar shard, where a sample whose members cannot be decoded comes as ``{"key",
        "error": reason}`` (:meth:`StorageFormat.iter_samples_tolerant`).

        Raises:
            OSError: missing or unreadable file.
        """
        for record in iter_records(path):
            try:
                yield sample_from_record(record)
            except Exception as error:  # a damaged member: this sample only
                try:
                    key = int(record["__key__"])
                except (KeyError, ValueError):
                    continue
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                yield {"key": key, "error": f"damaged sample record ({first})"}
