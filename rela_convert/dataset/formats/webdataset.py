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

import contextlib
import functools
import io
import mmap
import os
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

    def abort(self) -> None:
        """Drop the unfinished shard: the file is closed without its end blocks (a full disk raises nothing here, nor
        when the writer is collected) and the temporary file deleted."""
        with contextlib.suppress(OSError):
            self.stream.close()  # closed even when flushing its buffer fails
        self.temporary.unlink(missing_ok=True)


#: Tar's block size, bytes: every header and every member's data start at a multiple of it.
BLOCK = 512
#: What marks a damaged record of :func:`iter_records` (the reason, a string).
DAMAGED = "__damaged__"
_REGULAR_FILE = (b"0", b"\0")


def _member_header(block: bytes) -> tuple[str, int, bool] | None:
    """Name, data size (bytes) and whether it is a regular file, of a ustar header block; None when the block is
    not a valid header (wrong checksum or size field: damaged, or not a header)."""
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if stored != sum(block) - sum(block[148:156]) + 8 * 32:  # the checksum field counts as 8 spaces
        return None
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    return (
        ((prefix + b"/" + name) if prefix else name).decode("utf-8", "replace"),
        size,
        block[156:157] in _REGULAR_FILE,
    )


def _split_name(name: str) -> tuple[str, str]:
    """A member name -> (sample key, member suffix), as webdataset groups them: the key is the name up to the first
    dot of its last path component."""
    folder, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), suffix


def iter_records(path: str | Path) -> Iterator[dict]:
    """The raw members of a tar shard grouped per sample, in stored order: dicts with ``__key__`` and one bytes
    value per member suffix (the whole shard, whichever rank or DataLoader worker reads it), grouped as webdataset's
    ``tarfile_to_samples`` groups them.

    The shard is read through a memory map, each 512-byte header parsed and its checksum checked here: about 10 us
    per sample against about 110 us through webdataset and Python's ``tarfile`` (``benchmarks/peers.py``). A header
    that fails its checksum (a damaged byte) is skipped, and reading goes on at the next valid header (headers start
    at multiples of 512 bytes): a damaged header costs only the sample whose member it heads, which carries
    :data:`DAMAGED` (the reason; :func:`_grouped` tells whose it is). Members other than regular files (folders,
    pax headers) are skipped.

    Raises:
        OSError: missing or unreadable file.
    """
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            return
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as shard:
            yield from _grouped(_members(shard, size))


def _members(shard: mmap.mmap, size: int) -> Iterator[tuple[str, bytes] | int]:
    """The regular members of a tar file's bytes as (name, data), and the offset of every damaged header met
    (an int) before the members that follow it."""
    position, damaged = 0, False
    while position + BLOCK <= size:
        block = shard[position : position + BLOCK]
        header = _member_header(block)
        if header is None:
            if not damaged and block.count(0) == BLOCK:
                return  # the end-of-archive marker
            if not damaged:
                yield position
            damaged, position = True, position + BLOCK
            continue
        name, length, regular = header
        damaged, start = False, position + BLOCK
        if start + length > size:
            yield position  # a truncated file: this member's data is cut off
            return
        position = start + -(-length // BLOCK) * BLOCK
        if regular:
            yield name, shard[start : start + length]


def _grouped(members: Iterator[tuple[str, bytes] | int]) -> Iterator[dict]:
    """Records of :func:`iter_records` from :func:`_members`, damaged ones marked.

    A damaged header costs the member it heads; its neighbours tell whose that member was. Between two members of one
    record: that record's. Between two records (or at the shard's start or end): the neighbour that lacks a member
    of the shard's intact records is marked, the other is read as stored; the members an intact record has are
    those of the first record with no damage next to it (the image counted as one member, whatever its format), and
    the records before it wait for it (a shard with no such record marks every record next to a damage).
    """
    from rela_convert.images import STORED_FORMATS  # imports torch: not at module import

    images = set(STORED_FORMATS.values())
    expected: frozenset | None = None  # the members of an intact record
    waiting: list[tuple[dict, str | None]] = []  # records next to a damage, until ``expected`` is known

    def members_of(record: dict) -> frozenset:
        return frozenset("image" if name in images else name for name in record if name not in ("__key__", DAMAGED))

    def judged(record: dict, near: str | None) -> dict:
        if near and DAMAGED not in record and (expected is None or not expected <= members_of(record)):
            record[DAMAGED] = f"a member missing ({near})"
        return record

    def finished(record: dict, near: str | None) -> list[dict]:
        """``record`` (``near``: a damage next to it) and those waiting, once whether they lack a member can be told."""
        nonlocal expected
        if expected is None and not near and DAMAGED not in record:
            expected = members_of(record)
        waiting.append((record, near))
        if expected is None:
            return []
        done = [judged(*item) for item in waiting]
        waiting.clear()
        return done

    record, before, damage = None, None, None  # damage: met since the last member
    for member in members:
        if isinstance(member, int):
            damage = damage or f"damaged tar header at byte {member}"
            continue
        key, suffix = _split_name(member[0])
        if record is not None and key == record["__key__"]:
            if damage:
                record[DAMAGED] = damage  # between two of its members: this record's
        else:
            if record is not None:
                yield from finished(record, before or damage)
            record, before = {"__key__": key}, damage
        damage = None
        record[suffix] = member[1]
    if record is not None:
        yield from finished(record, before or damage)
    yield from (judged(*item) for item in waiting)


def sample_from_record(record: dict) -> dict:
    """One record of :func:`iter_records` -> the sample dict of :meth:`StorageFormat.iter_samples`
    (``key``, ``image``, ``ext``, ``feature`` float32 ``[D]``, ``label``, ``relpath``).

    Raises:
        ValueError: a damaged record: marked :data:`DAMAGED`, an unparsable key or class, no image member, or a
            damaged feature member.
        KeyError: a member missing from the record.
    """
    from rela_convert.images import STORED_FORMATS  # imports torch: not at module import

    if DAMAGED in record:
        raise ValueError(record[DAMAGED])
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
