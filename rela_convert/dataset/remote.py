"""Converted datasets at a URL: read (and written) through fsspec, with retries, SHA-256 checks and a shard cache.

``rela train``, ``inspect``, ``select`` and ``study`` take DATA as a folder or a URL. A URL is anything with a
scheme (``scheme://...`` or a chained fsspec URL ``a::b://...``) other than ``file://``, opened with
:func:`fsspec.core.url_to_fs`: ``s3://bucket/prefix`` (s3fs), ``http(s)://host/prefix`` (aiohttp),
``gs://`` (gcsfs), ``az://`` / ``abfs://`` (adlfs) and whatever else fsspec knows. The back-ends are
optional: ``pip install 'rela[remote]'`` installs s3fs and aiohttp; gcsfs / adlfs are installed by hand.
:func:`dataset_root` turns DATA into a local :class:`~pathlib.Path` or a :class:`RemoteFolder`; the readers
(index, shards, ``keys.npy``, ``pca.npz``, ``selection.npz``) accept either.

Storage options (endpoint, credentials, region, ...) are the keyword arguments of the fsspec file system: a JSON
object in ``RELA_STORAGE_OPTIONS`` (what ``--storage-options`` sets), e.g. ``{"endpoint_url":
"http://127.0.0.1:9000", "key": "...", "secret": "..."}`` for an S3-compatible server. fsspec's own
``FSSPEC_<PROTOCOL>_<OPTION>`` variables and each back-end's usual credential chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL``, ``~/.aws``, instance roles; ``GOOGLE_APPLICATION_CREDENTIALS``;
...) apply as usual. Unless the options set them, connections time out after :data:`CONNECT_TIMEOUT` seconds and
reads that stall after :data:`READ_TIMEOUT` seconds (HTTP and S3), so a hung connection is retried.

Shards are never downloaded up front: a DataLoader worker fetches each of its shards whole into a local file just
before it reads it (the next one in a background thread while it reads the current one), hashing the bytes as they
are written (no second pass): into the shard cache when ``RELA_CACHE_DIR`` (``--cache-dir``) is set
(:class:`rela_convert.dataset.shard_cache.ShardCache`: kept between epochs and runs, least recently used shards
evicted above ``RELA_CACHE_LIMIT`` bytes), else into a temporary file (``$TMPDIR``) deleted once read. A shard
whose bytes do not match the size and SHA-256 that ``index.json`` records is fetched once more, then refused with
a one-line :class:`ContentMismatchError` naming it; so is ``keys.npy``, ``pca.npz`` or ``selection.npz``. A cached
shard is re-hashed the first time a run reads it when the run checks shards (``rela train --verify-shards first``).

Transient errors (HTTP 5xx, 408 and 429, timeouts, refused or dropped connections, truncated transfers) are
retried with exponential back-off (:data:`RETRY_BACKOFF` seconds doubling, with jitter) at most
:data:`RETRY_ATTEMPTS` times and :data:`RETRY_SECONDS` seconds per file, then reported as one-line
:class:`RemoteError`; a missing file or a refused permission is not retried. A transfer that drops part-way
resumes where it stopped when the back-end reads byte ranges (object stores), and starts again over HTTP.

Importing this module imports nothing heavy (no fsspec, numpy or torch).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import itertools
import json
import logging
import os
import random
import re
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from rela_convert.dataset.files import DatasetError, no_space, sha256_file, write_atomic

#: JSON object of fsspec storage options (``--storage-options``).
STORAGE_OPTIONS_VARIABLE = "RELA_STORAGE_OPTIONS"
#: Folder of the local shard cache (``--cache-dir``); unset or empty: no cache.
CACHE_DIR_VARIABLE = "RELA_CACHE_DIR"
#: Most bytes the shard cache keeps (``--cache-limit``; :func:`parse_bytes` spelling); unset, empty or 0: no limit.
CACHE_LIMIT_VARIABLE = "RELA_CACHE_LIMIT"

#: Attempts per file before a transient error is reported (the first try included).
RETRY_ATTEMPTS = 5
#: Seconds per file after which no further attempt is started.
RETRY_SECONDS = 60.0
#: Seconds before the first retry; doubled at every further one (at most :data:`RETRY_BACKOFF_MAX`), +-20% jitter.
RETRY_BACKOFF = 0.5
RETRY_BACKOFF_MAX = 8.0
#: Default seconds to open a connection, and to wait for the next bytes of a response (HTTP and S3).
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0
#: Bytes per read of a download (and per ranged request on object stores).
CHUNK_BYTES = 8 << 20
#: Shards a reader fetches ahead of the one it reads (:meth:`RemoteFolder.shards_ahead`).
PREFETCH_SHARDS = 1
#: Concurrent requests of :meth:`RemoteFolder.sizes`.
SIZE_REQUESTS = 8
#: Protocols that cannot be written (``rela select`` and ``rela push`` refuse them at once).
READ_ONLY_PROTOCOLS = ("http", "https")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")
_HTTP_STATUS_RETRIED = (408, 429)
_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT}
#: Names of exception classes (anywhere in the class hierarchy) of transient transport errors, so that aiohttp,
#: botocore, urllib3 and fsspec need not be imported to recognise them.
_TRANSIENT_NAMES = frozenset(
    {
        "ClientConnectionError",  # aiohttp: refused, reset, server disconnected, ...
        "ClientPayloadError",  # aiohttp: response body cut short
        "ServerTimeoutError",
        "ConnectionError",  # botocore's (EndpointConnectionError, ConnectionClosedError, ...)
        "HTTPClientError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteRead",
        "IncompleteReadError",
        "ProtocolError",
        "FSTimeoutError",
        "TruncatedTransfer",
    }
)

_log = logging.getLogger(__name__)
_jitter = random.Random()  # never the global generator: the trainer's augmentations draw from that
T = TypeVar("T")


class RemoteError(OSError):
    """A file at a URL that cannot be read or written (after the retries a transient error gets), or a missing
    back-end; the message (one line) names the URL, the last error and the attempts made."""


class ContentMismatchError(DatasetError):
    """A file at a URL whose bytes differ from the size or SHA-256 its ``index.json`` records, also when fetched a
    second time; the message (one line) names it and the fix."""


class TruncatedTransfer(OSError):
    """A transfer that ended before the size the index records (retried as a dropped connection)."""


def is_url(where: Any) -> bool:
    """Whether ``where`` names a dataset through fsspec rather than a local folder: a :class:`RemoteFolder`, or a
    string with a scheme (``s3://``, ``https://``, ``simplecache::s3://``, ...) other than ``file://``."""
    if isinstance(where, RemoteFolder):
        return True
    return isinstance(where, str) and bool(_URL.match(where)) and not where.lower().startswith("file://")


def dataset_root(where: str | Path | RemoteFolder) -> Path | RemoteFolder:
    """The dataset ``where`` as its readers take it: a :class:`RemoteFolder` for a URL (:func:`is_url`; storage
    options and cache from the environment, :func:`settings`), else a local :class:`~pathlib.Path` (a
    ``file://`` URL loses its scheme).

    Raises:
        ValueError: ``RELA_STORAGE_OPTIONS`` or ``RELA_CACHE_LIMIT`` cannot be parsed.
    """
    if isinstance(where, (Path, RemoteFolder)):
        return where
    if is_url(where):
        options, cache_dir, cache_limit = settings()
        return RemoteFolder(where, options, cache_dir, cache_limit)
    text = str(where)
    return Path(text[len("file://") :] if text.lower().startswith("file://") else text)


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options`` / ``RELA_STORAGE_OPTIONS``: a JSON object (None or empty: ``{}``).

    Raises:
        ValueError: not JSON, or not an object.
    """
    if not text or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ValueError(f"storage options are not JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"storage options must be a JSON object, not a {type(value).__name__}")
    return value


_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str | int | None) -> int | None:
    """A byte count: an integer, or a number with a unit K, M, G or T (powers of 1024; ``KB``, ``KiB`` ... are
    read the same), e.g. ``50G``. None, empty and 0 mean no limit (None).

    Raises:
        ValueError: not a number of bytes, or negative.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, int):
        value = text
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
        if not found:
            raise ValueError(f"{text!r} is not a number of bytes (e.g. 500000000, 500M, 50G)")
        value = int(float(found.group(1)) * _BYTE_UNITS[found.group(2).upper()])
    if value < 0:
        raise ValueError(f"a byte count cannot be negative ({text!r})")
    return value or None


def settings() -> tuple[dict[str, Any], Path | None, int | None]:
    """``(storage options, cache folder or None, cache limit in bytes or None)`` from :data:`STORAGE_OPTIONS_VARIABLE`,
    :data:`CACHE_DIR_VARIABLE` and :data:`CACHE_LIMIT_VARIABLE`.

    Raises:
        ValueError: a variable that cannot be parsed (:func:`parse_storage_options`, :func:`parse_bytes`).
    """
    cache_dir = os.environ.get(CACHE_DIR_VARIABLE) or None
    return (
        parse_storage_options(os.environ.get(STORAGE_OPTIONS_VARIABLE)),
        Path(cache_dir).expanduser() if cache_dir else None,
        parse_bytes(os.environ.get(CACHE_LIMIT_VARIABLE)),
    )


def _http_status(error: BaseException) -> int | None:
    status = getattr(error, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(error, "response", None)  # botocore.exceptions.ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    return None


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is worth retrying: an HTTP status 5xx, 408 or 429, a
    timeout, a refused, reset or dropped connection, a truncated transfer. A missing file (HTTP 404, S3
    NoSuchKey), a refused permission, a full local disk and every other error are not."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        status = _http_status(current)
        if status is not None:
            return status >= 500 or status in _HTTP_STATUS_RETRIED
        if isinstance(current, (TimeoutError, ConnectionError)):
            return True
        if {cls.__name__ for cls in type(current).__mro__} & _TRANSIENT_NAMES:
            return True
        if isinstance(current, OSError) and not isinstance(current, _PERMANENT_OS_ERRORS):
            if current.errno in (errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
                return True
        current = current.__cause__ or current.__context__
    return False


def describe(error: BaseException) -> str:
    """One line for a transport error: ``Type: first line`` (an HTTP status as ``HTTP 503``)."""
    status = _http_status(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if status is not None:
        return f"HTTP {status}" + (f" ({text})" if text and str(status) not in text else "")
    cause = error.__cause__
    if not text and cause is not None:
        return describe(cause)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def _with_defaults(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    """The storage options with rela's time-outs added where the user set none (HTTP and S3)."""
    options = dict(options)
    if protocol in ("http", "https") and "client_kwargs" not in options:
        import aiohttp

        options["client_kwargs"] = {
            "timeout": aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
        }
    elif protocol in ("s3", "s3a") and "config_kwargs" not in options:
        options["config_kwargs"] = {  # botocore retries once itself (s3fs and retry() add theirs)
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
            "retries": {"max_attempts": 2, "mode": "standard"},
        }
    return options


class RemoteFolder:
    """A converted dataset (or a destination of ``rela push``) at a URL, read and written through fsspec.

    Stands where a dataset :class:`~pathlib.Path` stands in messages: ``str()`` is the URL, ``folder / name``
    the URL of a file in it (a string), :meth:`resolve` itself. It is not an ``os.PathLike``: code that would
    open it as a local path fails loudly. The fsspec file system is made in the process that uses it (DataLoader
    workers fork), and the object pickles without it.

    Args:
        url: the folder's URL (a trailing ``/`` is ignored).
        storage_options: keyword arguments of the fsspec file system (endpoint, credentials, ...).
        cache_dir: folder of the shard cache (:class:`~rela_convert.dataset.shard_cache.ShardCache`); None: no cache,
            shards go to temporary files deleted once read.
        cache_limit: most bytes the cache keeps (None: no limit).

    Attributes:
        url, storage_options, cache (a ``ShardCache`` or None).
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        cache_limit: int | None = None,
    ) -> None:
        from rela_convert.dataset.shard_cache import ShardCache

        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.cache = ShardCache(cache_dir, cache_limit) if cache_dir else None
        self._fs: Any = None
        self._path = ""
        self._pid = -1

    # Path-like behaviour for messages and for callers that print or store the dataset's location.
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemoteFolder({self.url!r})"

    def __truediv__(self, name: str) -> str:
        return self.url_of(name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteFolder) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_pid": -1}

    def resolve(self) -> RemoteFolder:
        """Itself (a URL is already absolute)."""
        return self

    @property
    def name(self) -> str:
        """The last part of the URL's path."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def protocol(self) -> str:
        """The URL's (last) scheme, lower case: ``s3``, ``https``, ..."""
        return self.url.split("://", 1)[0].rsplit("::", 1)[-1].lower()

    @property
    def writable(self) -> bool:
        """False for the protocols of :data:`READ_ONLY_PROTOCOLS` (HTTP)."""
        return self.protocol not in READ_ONLY_PROTOCOLS

    @property
    def fs(self):
        """The fsspec file system (made on first use in each process).

        Raises:
            RemoteError: the protocol's back-end is not installed, or the URL or options are not accepted.
        """
        if self._fs is None or self._pid != os.getpid():
            try:
                import fsspec.core

                self._fs, self._path = fsspec.core.url_to_fs(
                    self.url, **_with_defaults(self.protocol, self.storage_options)
                )
            except ImportError as error:
                raise RemoteError(
                    f"{self.url}: {error} (pip install 'rela[remote]' installs s3fs and aiohttp; gcsfs, adlfs ... "
                    "for other protocols)"
                ) from None
            except (ValueError, TypeError) as error:
                raise RemoteError(f"{self.url}: cannot open it with fsspec ({describe(error)})") from None
            self._path, self._pid = self._path.rstrip("/"), os.getpid()
        return self._fs

    def path_of(self, name: str) -> str:
        """The fsspec path of file ``name`` of the folder."""
        _ = self.fs  # makes the file system, which sets the folder's path
        return f"{self._path}/{name}"

    def url_of(self, name: str) -> str:
        """The URL of file ``name`` of the folder."""
        return f"{self.url}/{name}"

    def retry(self, name: str, call: Callable[[], T], action: str = "read") -> T:
        """``call()``, retried on transient errors (:func:`is_transient`) after a back-off, at most
        :data:`RETRY_ATTEMPTS` times and :data:`RETRY_SECONDS` seconds.

        Raises:
            RemoteError: still failing with a transient error; one line naming the URL of ``name``.
            Exception: a permanent error, as ``call`` raised it (``FileNotFoundError`` for a missing file).
        """
        started, attempt = time.monotonic(), 0
        while True:
            try:
                return call()
            except TypeError as error:  # options the back-end does not take (bad --storage-options), found late
                raise RemoteError(
                    f"{self.url_of(name)} cannot be {action}: {describe(error)} (check --storage-options / "
                    f"{STORAGE_OPTIONS_VARIABLE})"
                ) from error
            except Exception as error:
                attempt += 1
                if not is_transient(error):
                    raise
                elapsed = time.monotonic() - started
                delay = min(RETRY_BACKOFF * 2 ** (attempt - 1), RETRY_BACKOFF_MAX) * _jitter.uniform(0.8, 1.2)
                if attempt >= RETRY_ATTEMPTS or elapsed + delay > RETRY_SECONDS:
                    raise RemoteError(
                        f"{self.url_of(name)} cannot be {action}: {describe(error)} (gave up after {attempt} "
                        f"attempts in {elapsed:.1f} s)"
                    ) from error
                _log.debug("%s: %s; retrying in %.2f s", self.url_of(name), describe(error), delay)
                time.sleep(delay)

    def read_bytes(self, name: str, sha256: str | None = None) -> bytes:
        """The bytes of file ``name`` (read whole: for small files), checked against ``sha256`` when given
        (a mismatch is fetched once more).

        Raises:
            FileNotFoundError: no such file.
            ContentMismatchError: the bytes differ from ``sha256`` twice.
            RemoteError: a transient error that outlasted the retries, or a missing back-end.
        """
        for attempt in range(2):
            data = self.retry(name, lambda: self.fs.cat_file(self.path_of(name)))
            if sha256 is None or sha256_bytes(data) == sha256:
                return data
            if attempt == 0:
                _log.warning("%s does not match its SHA-256 in index.json; fetching it again", self.url_of(name))
        raise ContentMismatchError(
            f"{self.url_of(name)} does not match the SHA-256 that {self.url_of('index.json')} records, also when "
            f"fetched again (changed or damaged since the dataset was pushed): check it with rela inspect {self.url} "
            "--verify, then push the dataset again"
        )

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``data`` as file ``name`` (one PUT on object stores: readers see the old or the new file whole).

        Raises:
            RemoteError: a read-only protocol, or a transient error that outlasted the retries.
            OSError: a permanent error (permissions, ...).
        """
        self.check_writable()
        self.retry(name, lambda: self.fs.pipe_file(self.path_of(name), data), "written")

    def check_writable(self) -> None:
        """Raises RemoteError for a protocol that cannot be written (:data:`READ_ONLY_PROTOCOLS`)."""
        if not self.writable:
            raise RemoteError(
                f"{self.url} is read-only ({self.protocol} cannot be written): write a local copy, then rela push it "
                "to a writable URL (s3://, gs://, ...)"
            )

    def sizes(self, names: list[str]) -> dict[str, int | None]:
        """Sizes in bytes of files ``names`` (requests in parallel, each retried): missing files are left out, a
        size the server does not tell is None.

        Raises:
            RemoteError: a transient error that outlasted the retries.
        """

        def size(name: str) -> tuple[str, int | None | bool]:
            try:
                info = self.retry(name, lambda: self.fs.info(self.path_of(name)))
            except FileNotFoundError:
                return name, False
            return name, info.get("size")

        with contextlib.suppress(Exception):
            self.fs.invalidate_cache()  # listings cached by an earlier call (s3fs) would hide changes
        with ThreadPoolExecutor(min(SIZE_REQUESTS, max(1, len(names)))) as pool:
            return {name: value for name, value in pool.map(size, names) if value is not False}

    def remove(self, name: str) -> None:
        """Delete file ``name`` (nothing when it is missing).

        Raises:
            RemoteError: a read-only protocol, or a transient error that outlasted the retries.
        """
        self.check_writable()
        with contextlib.suppress(FileNotFoundError):
            self.retry(name, lambda: self.fs.rm_file(self.path_of(name)), "deleted")

    def upload(self, local: Path, name: str, progress: Callable[[int], None] | None = None) -> None:
        """Copy local file ``local`` to file ``name`` of the folder (restarted on a transient error), then check
        the size there.

        Args:
            progress: called with each number of bytes sent (negative when a retry starts again).

        Raises:
            RemoteError: a read-only protocol, a transient error that outlasted the retries, or another size there.
            OSError: a permanent error (permissions, ...).
        """
        from fsspec.callbacks import Callback

        self.check_writable()

        class Counter(Callback):
            sent = 0

            def relative_update(self, inc: int = 1) -> None:
                self.sent += inc
                if progress:
                    progress(inc)

            def absolute_update(self, value: int) -> None:
                self.relative_update(value - self.sent)

        counter = Counter()
        target = self.path_of(name)

        def put() -> None:
            if counter.sent:
                counter.relative_update(-counter.sent)
            if self.protocol == "file":
                self.fs.makedirs(self._path, exist_ok=True)
            self.fs.put_file(str(local), target, callback=counter)

        self.retry(name, put, "written")
        size = local.stat().st_size
        if counter.sent != size:  # back-ends that do not report progress (local copies)
            counter.relative_update(size - counter.sent)
        found = self.sizes([name]).get(name, -1)
        if found not in (size, None):
            raise RemoteError(f"{self.url_of(name)} holds {found} bytes after the upload of {size}: push again")

    def download(self, name: str, target: Path, size: int | None) -> tuple[str, int]:
        """Copy file ``name`` into local file ``target`` (overwritten), hashing the bytes as they are written.

        Object stores are read in ranges of :data:`CHUNK_BYTES` up to ``size`` (a retry resumes at the last
        byte received); HTTP in one streamed GET (a retry starts again).

        Args:
            size: bytes the index records (None: read to the end).

        Returns:
            ``(hex SHA-256, bytes written)``.

        Raises:
            FileNotFoundError: no such file.
            RemoteError: a transient error that outlasted the retries.
            OSError: ``target`` cannot be written.
        """
        path = self.path_of(name)
        state = {"digest": hashlib.sha256(), "done": 0}
        with open(target, "wb") as out:

            def write(chunk: bytes) -> None:
                out.write(chunk)
                state["digest"].update(chunk)
                state["done"] += len(chunk)

            def restart() -> None:
                out.seek(0)
                out.truncate()
                state.update(digest=hashlib.sha256(), done=0)

            def attempt() -> None:
                if self.protocol in ("http", "https") or size is None:
                    restart()
                    options = {"block_size": 0, "size": size} if self.protocol in ("http", "https") else {}
                    with self.fs.open(path, "rb", **options) as source:
                        while chunk := source.read(CHUNK_BYTES):
                            write(chunk)
                    if size is not None and state["done"] < size:
                        raise TruncatedTransfer(f"the transfer ended after {state['done']} of {size} bytes")
                    return
                while state["done"] < size:
                    start = state["done"]
                    chunk = self.fs.cat_file(path, start=start, end=min(start + CHUNK_BYTES, size))
                    if not chunk:  # shorter than recorded: the hash check reports it
                        break
                    write(chunk)

            self.retry(name, attempt)
            out.flush()
            os.fsync(out.fileno())
        return state["digest"].hexdigest(), state["done"]

    def _fetch_checked(self, name: str, size: int, sha256: str, target: Path) -> str:
        """Download ``name`` into ``target`` until its bytes match ``size`` and ``sha256`` (two tries); returns
        the SHA-256. Raises ContentMismatchError, FileNotFoundError or RemoteError."""
        for attempt in range(2):
            digest, received = self.download(name, target, size)
            if received == size and digest == sha256:
                return digest
            if attempt == 0:
                _log.warning(
                    "%s: %d bytes with SHA-256 %s, index.json records %d bytes, %s; fetching it again",
                    self.url_of(name),
                    received,
                    digest[:16],
                    size,
                    sha256[:16],
                )
        raise ContentMismatchError(
            f"shard {self.url_of(name)} does not match the size and SHA-256 that {self.url_of('index.json')} "
            f"records for it, also when fetched again ({received} bytes, SHA-256 {digest[:16]}...; recorded: {size} "
            f"bytes, {sha256[:16]}...): it changed on the server or was damaged since the dataset was pushed; check "
            f"it with rela inspect {self.url} --verify, then push the dataset again"
        )

    def _fetch_into(self, name: str, size: int, sha256: str, target: Path) -> str:
        """:meth:`_fetch_checked`, where a full disk names ``target``'s folder and the shard's size
        (:func:`~rela_convert.dataset.files.no_space`)."""
        try:
            return self._fetch_checked(name, size, sha256, target)
        except OSError as error:
            raise no_space(error, target.parent, size) from None

    @contextlib.contextmanager
    def shard(self, name: str, size: int, sha256: str, check_cached: bool = True) -> Iterator[tuple[Path, str | None]]:
        """A verified local copy of shard ``name`` while the context lasts.

        From the cache when it holds the shard (re-hashed first when ``check_cached``; a copy that no longer
        matches is dropped and fetched again), else downloaded (:meth:`download`, checked against ``size`` and
        ``sha256``, fetched once more on a mismatch) into the cache or, without one, into a temporary file
        deleted when the context ends. A cached copy is locked while the context lasts, so that no other process
        evicts it.

        Yields:
            ``(local path, hex SHA-256 when this call checked it, else None)``.

        Raises:
            ContentMismatchError: the shard's bytes differ from the index twice.
            FileNotFoundError: no such shard at the URL.
            RemoteError: a transient error that outlasted the retries, or a missing back-end.
            OSError: the cache or temporary folder cannot be written.
        """
        if self.cache is None:
            target = Path(tempfile.gettempdir()) / f"rela-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"
            try:
                digest = self._fetch_into(name, size, sha256, target)
                yield target, digest
            finally:
                target.unlink(missing_ok=True)
            return
        cached, digest = self.cache.open(sha256, name, size), None
        if cached is not None and check_cached:
            digest = sha256_file(cached.path)
            if digest != sha256:
                _log.warning("%s in the cache no longer matches its SHA-256; fetching it again", cached.path)
                self.cache.discard(cached)
                cached, digest = None, None
        if cached is None:
            part = self.cache.temporary(name)
            try:
                digest = self._fetch_into(name, size, sha256, part)
                cached = self.cache.add(part, sha256, name)
            finally:
                part.unlink(missing_ok=True)
        try:
            yield cached.path, digest
        finally:
            cached.close()

    def shards_ahead(
        self, requests: list[tuple[str, int, str, bool]], ahead: int = PREFETCH_SHARDS
    ) -> Iterator[tuple[Path, str | None]]:
        """:meth:`shard` for each of ``requests`` (``(name, size, sha256, check_cached)``) in order, fetching the next
        ``ahead`` shards in a background thread while the caller reads the current one (downloads overlap
        decoding). Each yielded copy stays valid until the next item is asked for, or the generator is closed;
        copies fetched ahead and not used are cleaned up on close.

        Yields:
            ``(local path, hex SHA-256 when checked, else None)`` per request.

        Raises:
            the errors of :meth:`shard`, each when its shard's turn comes.
        """

        def start(request: tuple[str, int, str, bool]) -> tuple[contextlib.ExitStack, Path, str | None]:
            stack = contextlib.ExitStack()
            try:
                path, digest = stack.enter_context(self.shard(*request))
            except BaseException:
                stack.close()
                raise
            return stack, path, digest

        pending: collections.deque = collections.deque()
        remaining = iter(requests)
        pool = ThreadPoolExecutor(1, thread_name_prefix="rela-fetch")
        try:
            for request in itertools.islice(remaining, ahead + 1):
                pending.append(pool.submit(start, request))
            while pending:
                stack, path, digest = pending.popleft().result()
                with stack:
                    following = next(remaining, None)
                    if following is not None:
                        pending.append(pool.submit(start, following))
                    yield path, digest
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            for future in pending:
                if not future.cancelled() and future.exception() is None:
                    future.result()[0].close()

    @contextlib.contextmanager
    def copy(self, name: str) -> Iterator[tuple[Path, str, int]]:
        """A temporary local copy of file ``name`` as it is at the URL, unchecked (what ``rela inspect --verify``
        checks), deleted when the context ends; the cache is not used.

        Yields:
            ``(local path, hex SHA-256, bytes)``.

        Raises:
            FileNotFoundError: no such file.
            RemoteError: a transient error that outlasted the retries.
        """
        target = Path(tempfile.gettempdir()) / f"rela-{os.getpid()}-{uuid.uuid4().hex[:8]}-{name}"
        try:
            digest, received = self.download(name, target, None)
            yield target, digest, received
        finally:
            target.unlink(missing_ok=True)


def read_small(root: Path | RemoteFolder, name: str, sha256: str | None = None) -> Path | io.BytesIO:
    """What ``numpy.load`` (or ``open``) reads for small file ``name`` of a dataset: its local path, or for a
    :class:`RemoteFolder` its bytes in memory, checked against ``sha256`` when given (local files are not hashed
    here: ``rela inspect --verify`` does that).

    Raises:
        FileNotFoundError: no such remote file (a local one raises when opened).
        ContentMismatchError, RemoteError: see :meth:`RemoteFolder.read_bytes`.
    """
    if isinstance(root, RemoteFolder):
        return io.BytesIO(root.read_bytes(name, sha256))
    return Path(root) / name


@contextlib.contextmanager
def shard_file(
    root: Path | RemoteFolder, record: dict, check_cached: bool = False
) -> Iterator[tuple[Path, str | None]]:
    """A local path of the shard that ``record`` (a :class:`~rela_convert.dataset.index.ShardRecord`) describes:
    the file itself in a local dataset (not hashed), a verified copy for a :class:`RemoteFolder`
    (:meth:`RemoteFolder.shard`).

    Yields:
        ``(path, hex SHA-256 when checked, else None)``.
    """
    if isinstance(root, RemoteFolder):
        with root.shard(record["name"], int(record["bytes"]), record["sha256"], check_cached) as opened:
            yield opened
    else:
        yield Path(root) / record["name"], None


def write_file(root: Path | RemoteFolder, name: str, data: bytes) -> None:
    """Write file ``name`` of a dataset: atomically in a local folder
    (:func:`~rela_convert.dataset.files.write_atomic`), in one PUT at a URL (:meth:`RemoteFolder.write_bytes`).

    Raises:
        OSError: the file cannot be written (:class:`RemoteError` for a read-only URL or lasting errors).
    """
    if isinstance(root, RemoteFolder):
        root.write_bytes(name, data)
    else:
        write_atomic(Path(root) / name, data)
