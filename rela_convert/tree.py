"""Listing a raw image tree: ``SRC/<folder>/.../<image>`` or a flat ``SRC/<image>``.

Files are listed in sorted order of their relative path (bytes order, so names
that are not valid UTF-8 still sort deterministically). Each image file gets a
stable integer key: its position in that listing. The first folder level below
SRC names the class (stored for evaluation, never used for training); images
directly in SRC have no label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rela_convert.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class SourceFile:
    """One image file to convert.

    Attributes:
        key: position in the sorted listing (stable for a given tree).
        path: absolute path, as the OS spells it.
        relpath: path relative to SRC, as raw bytes (``os.fsencode``).
        label: index into :attr:`Listing.classes`, or None.
    """

    key: int
    path: str
    relpath: bytes
    label: int | None


@dataclass
class Listing:
    """What :func:`scan_tree` found.

    Attributes:
        files: the image files, sorted, keys 0..len-1.
        classes: sorted class (first-level folder) names; empty for a flat tree.
        skipped: ``{"path": str, "reason": str}`` for every entry that is not converted.
    """

    files: list[SourceFile]
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)


def display_path(relpath: bytes) -> str:
    """A printable form of a raw relative path (undecodable bytes become ``\\xNN``)."""
    return relpath.decode("utf-8", "backslashreplace")


def _hidden(relpath: bytes) -> bool:
    return any(part.startswith(b".") for part in relpath.split(b"/"))


def scan_tree(src: str | Path) -> Listing:
    """List the images under ``src``, following symbolic links once.

    Every file under ``src`` is either listed or recorded as skipped with its
    reason: hidden files (a path component below ``src`` starts with ``.``),
    entries that are not regular files (FIFOs, sockets, devices), names without
    an image extension (:data:`rela_convert.images.IMAGE_EXTENSIONS`) and broken
    symbolic links. Every directory is walked at most once, real directories
    before those reached through a symbolic link, so a link to a directory that
    is walked anyway (a loop, or a second link to it) is recorded as skipped.

    Args:
        src: root of the tree.

    Returns:
        A :class:`Listing`; ``skipped`` is sorted by path.

    Raises:
        NotADirectoryError: ``src`` is not a directory.
    """
    root = os.fsencode(os.path.abspath(src))
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{os.fsdecode(root)} is not a directory")
    found: list[bytes] = []
    skipped: list[dict] = []
    visited: set[tuple[int, int]] = set()
    linked_directories: list[bytes] = []

    def skip(path: bytes, reason: str) -> None:
        skipped.append({"path": display_path(os.path.relpath(path, root)), "reason": reason})

    def walk(directory: bytes) -> None:
        stat = os.stat(directory)
        identity = (stat.st_dev, stat.st_ino)
        if identity in visited:
            skip(directory, "directory already walked (symbolic link loop or second link to it)")
            return
        visited.add(identity)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            skip(directory, f"unreadable directory: {error.strerror}")
            return
        for entry in entries:
            relpath = os.path.relpath(entry.path, root)
            if not os.path.exists(entry.path):
                skip(entry.path, "broken symbolic link (missing target or link loop)")
            elif entry.is_dir():
                if entry.is_symlink():
                    linked_directories.append(entry.path)
                else:
                    walk(entry.path)
            elif _hidden(relpath):
                skip(entry.path, "hidden file (a path component starts with '.')")
            elif not entry.is_file():
                skip(entry.path, "not a regular file")
            elif os.path.splitext(entry.name)[1].lower().decode("utf-8", "replace") not in IMAGE_EXTENSIONS:
                skip(entry.path, f"not an image file extension (reads {', '.join(IMAGE_EXTENSIONS)})")
            else:
                found.append(relpath)

    walk(root)
    while linked_directories:
        walk(linked_directories.pop(0))
    skipped.sort(key=lambda entry: entry["path"])
    found.sort()
    classes = sorted({rel.split(b"/", 1)[0] for rel in found if b"/" in rel})
    class_index = {name: index for index, name in enumerate(classes)}
    files = [
        SourceFile(
            key,
            os.fsdecode(os.path.join(root, rel)),
            rel,
            class_index.get(rel.split(b"/", 1)[0]) if b"/" in rel else None,
        )
        for key, rel in enumerate(found)
    ]
    return Listing(files, [os.fsdecode(name) for name in classes], skipped)
