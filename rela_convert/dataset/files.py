"""What every file of a converted dataset (and of a training run) goes through: atomic writes, SHA-256 hashes,
and :class:`DatasetError`, the error of a dataset that cannot be used.

Importing this module imports nothing heavy (no numpy, no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


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


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, and rename.

    Raises:
        OSError: the file cannot be written.
    """
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


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
