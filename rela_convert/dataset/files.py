"""What every file of a converted dataset (and of a training run) goes through: atomic writes, SHA-256 hashes,
and :class:`DatasetError`, the error of a dataset that cannot be used.

Importing this module imports nothing heavy (no numpy, no torch).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

#: ``errno`` values of a write that found no room: a full disk, an exceeded quota.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DatasetError(ValueError):
    """A converted dataset that cannot be used (missing, incompatible or incomplete index)."""


def sha256_file(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes, streamed in 1 MiB blocks (constant memory).

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def no_space(error: OSError, folder: str | Path, needed: int) -> OSError:
    """``error`` made to say where room is missing and how much: for a full disk or quota (errno in
    :data:`NO_SPACE`) an ``OSError`` of the same errno, without file name, whose message is the system's (one line,
    whatever the library that raised it said) and ``"; FOLDER needs about N MB more (M MB free)"`` (``needed``:
    bytes still to write there; the free bytes when ``folder`` is a local folder; an error made so already is made
    again with these figures); any other error as it is."""
    if error.errno not in NO_SPACE:
        return error
    try:
        free = f" ({shutil.disk_usage(folder).free / 1e6:.1f} MB free)"
    except OSError:  # a URL, or a folder that does not exist
        free = ""
    message = f"{os.strerror(error.errno)}; {folder} needs about {needed / 1e6:.1f} MB more{free}"
    return OSError(error.errno, message)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, and rename. A write that fails removes the
    temporary file (``path`` is as it was).

    Raises:
        OSError: the file cannot be written; on a full disk it names the folder and the bytes needed
            (:func:`no_space`).
    """
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise no_space(error, path.parent, len(data)) from None


def json_bytes(value: Any) -> bytes:
    """``value`` as indented (2), key-sorted JSON with a final newline, UTF-8: deterministic bytes."""
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def write_json_atomic(path: Path, value: dict) -> None:
    """Write ``value`` as :func:`json_bytes`, atomically (:func:`write_atomic`).

    Raises:
        OSError: the file cannot be written.
    """
    write_atomic(path, json_bytes(value))


def write_jsonl_atomic(path: Path, items: list[dict]) -> None:
    """Write ``items`` as JSON Lines (one key-sorted object per line), atomically (:func:`write_atomic`).

    Raises:
        OSError: the file cannot be written.
    """
    write_atomic(path, "".join(json.dumps(item, sort_keys=True) + "\n" for item in items).encode())
