"""A local cache of whole shard files fetched from a URL, shared by processes, evicted least recently used first.

Layout of the cache folder (``--cache-dir``): one file per shard, named ``<sha256>-<name>`` after the SHA-256
that ``index.json`` records for it (so datasets holding the same shard share it, and a shard changed at the
URL gets a new entry while the old one ages out), and ``tmp/`` with downloads in progress. A file enters the
cache only after its size and SHA-256 were checked (:meth:`rela_convert.dataset.remote.RemoteFolder.shard`): it is
downloaded into ``tmp/`` and hard-linked (or renamed) into place, never over an existing entry.

Recency is the file's modification time, set when a shard is added or used. Eviction (after every addition)
deletes the least recently used entries until the folder holds at most ``limit`` bytes; an entry a process is
reading is locked (a shared ``flock``, held while its shard is read) and never evicted, so the cache may exceed
the limit by the shards in use. Downloads left in ``tmp/`` by killed processes are deleted after a day.

Every rank and DataLoader worker may share one cache folder. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks (a reader may then lose its shard to eviction)
    fcntl = None  # type: ignore[assignment]

TEMPORARY_FOLDER = "tmp"
#: Seconds after which a download left in ``tmp/`` (by a killed process) is deleted.
STALE_SECONDS = 24 * 3600


@dataclass
class CachedShard:
    """A shard file in the cache, open and locked against eviction until :meth:`close`.

    Attributes:
        path: the file's path in the cache.
        handle: an open binary file of it, holding the shared lock.
        cache: the cache it belongs to; closing evicts above its limit again, so that entries kept only
            because a reader held them leave once it is done.
    """

    path: Path
    handle: BinaryIO
    cache: ShardCache

    def close(self) -> None:
        """Release the lock (the file may be evicted from now on), then bring the cache back within its limit."""
        self.handle.close()
        self.cache.evict()


def _lock_shared(handle: BinaryIO) -> None:
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)


class ShardCache:
    """The shard cache in ``folder`` (created on first use), kept at most ``limit`` bytes (see the module docstring).

    Args:
        folder: the cache folder.
        limit: most bytes kept, shards in use excepted (None or 0: no limit).
    """

    def __init__(self, folder: str | Path, limit: int | None = None) -> None:
        self.folder = Path(folder)
        self.limit = limit or None

    def entry(self, sha256: str, name: str) -> Path:
        """The cache path of shard ``name`` with SHA-256 ``sha256``."""
        return self.folder / f"{sha256}-{name}"

    def open(self, sha256: str, name: str, size: int) -> CachedShard | None:
        """The cached copy of a shard, locked, and marked as used now; None when the cache does not hold it (or
        holds a file of another size, which is then dropped).

        Raises:
            OSError: the cache folder cannot be read.
        """
        path = self.entry(sha256, name)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return None
        _lock_shared(handle)
        status = os.fstat(handle.fileno())
        if status.st_nlink == 0:  # evicted between the open and the lock
            handle.close()
            return None
        cached = CachedShard(path, handle, self)
        if status.st_size != size:
            self.discard(cached)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)
        return cached

    def temporary(self, name: str) -> Path:
        """A fresh path in ``tmp/`` to download shard ``name`` into (same file system as the entries).

        Raises:
            OSError: the folder cannot be created.
        """
        folder = self.folder / TEMPORARY_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part"

    def add(self, temporary: Path, sha256: str, name: str) -> CachedShard:
        """Put the checked download ``temporary`` into the cache as shard ``name`` (an entry another process added
        meanwhile is kept and ``temporary`` dropped), evict above the limit, and return the entry locked.

        Raises:
            OSError: the cache cannot be written.
        """
        path, size = self.entry(sha256, name), temporary.stat().st_size
        for _ in range(3):  # another process may evict the entry before it is locked (only under a tiny limit)
            try:
                os.link(temporary, path)
            except FileExistsError:  # added meanwhile by another process: kept unless damaged
                if os.stat(path).st_size != size:
                    os.replace(temporary, path)
            except OSError:  # no hard links on this file system: a rename (may replace an equal entry)
                if temporary.exists():
                    os.replace(temporary, path)
            try:
                handle = open(path, "rb")
            except FileNotFoundError:
                continue
            _lock_shared(handle)
            if os.fstat(handle.fileno()).st_nlink:
                break
            handle.close()
        else:
            raise FileNotFoundError(f"{path} was evicted while it was being added: raise --cache-limit")
        temporary.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.utime(path)
        self.evict(keep=path)
        return CachedShard(path, handle, self)

    def discard(self, cached: CachedShard) -> None:
        """Close ``cached`` and delete its file (a copy that no longer matches), unless another process has
        already put a new copy in its place."""
        inode = os.fstat(cached.handle.fileno()).st_ino
        cached.close()
        with contextlib.suppress(OSError):
            if os.stat(cached.path).st_ino == inode:
                cached.path.unlink()

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(last use as a time stamp, bytes, path)`` of every cached shard, least recently used first."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for path in self.folder.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    status = path.stat()
                    if path.is_file():
                        found.append((status.st_mtime, status.st_size, path))
        return sorted(found)

    def usage(self) -> int:
        """Bytes held by the cached shards (downloads in progress excluded)."""
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used shards until at most :attr:`limit` bytes are left, skipping ``keep`` and
        shards locked by a reader; also delete stale downloads in ``tmp/``. Returns the bytes freed."""
        self._drop_stale_downloads()
        if self.limit is None:
            return 0
        entries = self.entries()
        total, freed = sum(size for _, size, _ in entries), 0
        for _, size, path in entries:
            if total <= self.limit:
                break
            if path != keep and self._remove_unless_locked(path):
                total -= size
                freed += size
        return freed

    @staticmethod
    def _remove_unless_locked(path: Path) -> bool:
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            return False
        with handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a reader holds it
                    return False
            try:
                if os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
                    return False
                path.unlink()
            except FileNotFoundError:
                return False
        return True

    def _drop_stale_downloads(self) -> None:
        folder = self.folder / TEMPORARY_FOLDER
        if not folder.is_dir():
            return
        now = time.time()
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_SECONDS:
                    path.unlink()
