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

Shards are written without the ``webdataset`` library but byte for byte as its
``TarWriter`` writes them (:class:`TarShardWriter`); the library (which imports torch)
is imported when a shard is read, not with this module.
"""

from __future__ import annotations

import functools
import io
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
#: Tar block and record sizes, bytes (``tarfile.BLOCKSIZE``, ``tarfile.RECORDSIZE``).
BLOCK, RECORD = 512, 20 * 512


def format_key(key: int) -> str:
    """Integer key (>= 0) -> the zero-padded ``__key__`` string of a shard member (:data:`KEY_DIGITS` digits)."""
    return f"{key:0{KEY_DIGITS}d}"


def encode_feature(feature: np.ndarray) -> bytes:
    """float32 ``[D]`` (other float dtypes are cast) -> ``.npy`` bytes (format version 1.0), the bytes of
    ``np.save``: its header, made once per shape (:func:`_npy_bytes_header`), then the little-endian values
    (about 1 us per feature instead of ``np.save``'s 50)."""
    feature = np.ascontiguousarray(feature, dtype=np.float32)
    return _npy_bytes_header(feature.shape) + feature.astype("<f4", copy=False).tobytes()


@functools.lru_cache(maxsize=16)
def _npy_bytes_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header (preamble and dict) that ``np.save`` writes for a float32 array of ``shape``."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(shape, "<f4"), allow_pickle=False)
    return buffer.getvalue()[: -4 * int(np.prod(shape, dtype=np.int64))]


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


#: The fixed attributes of every tar member (so the same samples give byte-identical shards).
MEMBER_OWNER, MEMBER_MODE, MEMBER_MTIME = "rela", 0o444, 0


@functools.lru_cache(maxsize=1)
def _ustar_template() -> bytes:
    """The ustar header block that Python's ``tarfile`` writes for a member with an empty name and size 0 and
    the fixed owner, mode and mtime; :func:`member_header` fills in name, size and checksum."""
    return _tarfile_header("", 0)


def _tarfile_header(name: str, size: int) -> bytes:
    """The header block(s) ``tarfile`` writes for a member (what webdataset's ``TarWriter`` writes: the default
    pax format, whose header is a plain ustar block unless a field does not fit one)."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MEMBER_MTIME, MEMBER_MODE
    info.uname = info.gname = MEMBER_OWNER
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def member_header(name: str, size: int) -> bytes:
    """The header of a tar member ``name`` of ``size`` bytes, byte for byte what ``tarfile`` (and so
    webdataset's ``TarWriter``) writes for it, made from a template: about 2 us against ``tarfile``'s 60.
    Names that are not ASCII or longer than 100 bytes and sizes of 8 GiB or more need a pax header:
    ``tarfile`` makes those."""
    if not name.isascii() or len(name) > 100 or size >= 8**11:
        return _tarfile_header(name, size)
    encoded = name.encode("ascii")
    header = bytearray(_ustar_template())
    header[: len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"        "  # the checksum is the byte sum with its own field as spaces
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


class TarShardWriter:
    """Writes one tar shard to ``<path>.tmp`` and renames it to ``path`` on :meth:`close`.

    The bytes are those of webdataset's ``TarWriter(mtime=0, mode=0o444, user="rela", group="rela",
    encoder=False)`` (members in sorted field order, each a ustar header, its data and NUL padding to 512 bytes;
    two zero blocks and padding to a 10,240-byte record at the end), written here without ``tarfile``'s
    per-member objects: about 10 us per sample against 250 (``tests/test_convert_formats.py`` checks the bytes).

    Raises:
        OSError: the output cannot be written.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temporary = path.with_name(path.name + ".tmp")
        self.stream = open(self.temporary, "wb", buffering=1 << 20)
        self.offset = 0
        self.count = 0

    def write(self, sample: Sample) -> None:
        """Append one sample (its members, see the module docstring)."""
        key = format_key(sample.key)
        members = {sample.ext: sample.image, FEATURE_FIELD: encode_feature(sample.feature), "path": sample.relpath}
        if sample.label is not None:
            members["cls"] = str(sample.label).encode()
        parts = []
        for field in sorted(members):
            data = members[field]
            parts += (member_header(f"{key}.{field}", len(data)), data, bytes(-len(data) % BLOCK))
        block = b"".join(parts)
        self.stream.write(block)
        self.offset += len(block)
        self.count += 1

    def close(self) -> ShardRecord:
        """Finish the shard: end the archive, fsync, rename into place (:func:`finish_shard`).

        Returns:
            ``{"name", "num_samples", "bytes", "sha256"}`` for ``index.json``.
        """
        end = self.offset + 2 * BLOCK
        self.stream.write(bytes(2 * BLOCK + -end % RECORD))
        self.stream.close()
        return finish_shard(self.temporary, self.path, self.count)


def iter_records(path: str | Path) -> Iterator[dict]:
    """The raw members of a tar shard grouped per sample, in stored order: dicts with
    ``__key__`` and one bytes value per member suffix (the whole shard, whichever rank or
    DataLoader worker reads it).

    Raises:
        OSError: missing or unreadable file.
    """
    import webdataset as wds

    # A bare pipeline: wds.WebDataset would add its default node and worker splitters,
    # which drop the shard in all but one DataLoader worker or rank.
    yield from wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())


def sample_from_record(record: dict) -> dict:
    """One record of :func:`iter_records` -> the sample dict of :meth:`StorageFormat.iter_samples`
    (``key``, ``image``, ``ext``, ``feature`` float32 ``[D]``, ``label``, ``relpath``).

    Raises:
        ValueError: a damaged record: an unparsable key or class, no image member, or a damaged
            feature member.
        KeyError: a member missing from the record.
    """
    from rela_convert.images import STORED_FORMATS  # imports torch: not at module import

    ext = next((field for field in STORED_FORMATS.values() if field in record), None)
    if ext is None:
        raise ValueError(f"sample {record.get('__key__')!r} has no image member")
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
