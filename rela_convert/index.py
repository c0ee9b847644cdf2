"""``index.json``: the description of a converted dataset, and atomic JSON writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

INDEX_NAME = "index.json"
FORMAT_NAME = "rela-converted"
FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A converted dataset that cannot be used (missing or incompatible index)."""


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


def write_json_atomic(path: Path, value: dict) -> None:
    """Write ``value`` as indented, key-sorted JSON (deterministic bytes), atomically."""
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def load_index(root: str | Path) -> dict:
    """Read ``root/index.json`` of a converted dataset.

    Raises:
        DatasetError: no index (not a converted dataset, or an unfinished
            conversion) or an unsupported format version.
    """
    path = Path(root) / INDEX_NAME
    if not path.is_file():
        raise DatasetError(f"{root} has no {INDEX_NAME}: not a converted dataset, or its conversion has not finished (run rela convert again to resume)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT_NAME or index.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path} is format {index.get('format')!r} v{index.get('format_version')}; this rela reads {FORMAT_NAME!r} v{FORMAT_VERSION}")
    return index
