"""Proving a converted dataset (a folder, or at a URL) intact against its ``index.json`` (``rela inspect --verify``)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from rela_convert.dataset.files import sha256_file
from rela_convert.dataset.formats import STORAGE_FORMATS, StorageFormat
from rela_convert.dataset.index import DatasetIndex, ShardRecord
from rela_convert.dataset.remote import RemoteFolder, dataset_root


def _verify_shard(
    root: Path | RemoteFolder,
    shard: ShardRecord,
    format: type[StorageFormat],
    feature_dim: int,
    expected_keys: np.ndarray | None,
) -> list[str]:
    name = shard["name"]
    if isinstance(root, RemoteFolder):  # the bytes at the URL, as they are (not the shard cache)
        try:
            with root.copy(name) as (path, digest, size):
                return _check_shard(path, size, digest, shard, format, feature_dim, expected_keys)
        except FileNotFoundError:
            return [f"{name}: missing"]
    path = root / name
    if not path.is_file():
        return [f"{name}: missing"]
    return _check_shard(path, path.stat().st_size, sha256_file(path), shard, format, feature_dim, expected_keys)


def _check_shard(
    path: Path,
    size: int,
    digest: str,
    shard: ShardRecord,
    format: type[StorageFormat],
    feature_dim: int,
    expected_keys: np.ndarray | None,
) -> list[str]:
    """The problems of shard file ``path`` (``size`` bytes, SHA-256 ``digest``) against its record."""
    name, problems = shard["name"], []
    if size != shard["bytes"]:
        problems.append(f"{name}: {size} bytes, the index says {shard['bytes']}")
    if digest != shard["sha256"]:
        problems.append(f"{name}: SHA-256 {digest} differs from the index's {shard['sha256']}")
    keys, bad_features = [], 0
    try:
        for sample in format.iter_samples(path):
            keys.append(sample["key"])
            bad_features += sample["feature"].shape != (feature_dim,) or sample["feature"].dtype != np.float32
    except Exception as error:  # a damaged tar or HDF5 file raises many kinds of errors
        return problems + [
            f"{name}: unreadable after {len(keys)} samples ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ]
    if len(keys) != shard["num_samples"]:
        problems.append(f"{name}: {len(keys)} samples, the index says {shard['num_samples']}")
    if expected_keys is not None:
        differences = [p for p, (key, expected) in enumerate(zip(keys, expected_keys.tolist())) if key != expected]
        if differences:
            position = differences[0]
            problems.append(
                f"{name}: {len(differences)} keys differ from its slice of keys.npy (first: sample {position} has "
                f"key {keys[position]}, keys.npy {expected_keys[position]}): samples out of order, or shards listed "
                "in another order"
            )
    if bad_features:
        problems.append(f"{name}: {bad_features} features are not float32 [{feature_dim}]")
    return problems


def verify_dataset(root: str | Path | RemoteFolder) -> tuple[int, list[str]]:
    """Re-hash and re-read every shard of every storage format listed in the index; at a URL
    (:mod:`rela_convert.dataset.remote`) each file is downloaded (to a temporary file, one at a time, never from the
    shard cache) and checked as the server holds it.

    Checks per shard: present, byte size and SHA-256 as recorded, readable, sample count,
    its keys in order equal to its slice of ``keys.npy`` (the shards of every format, in
    index order, are consecutive slices of ``keys.npy``: samples are stored in the seeded
    order of :attr:`~rela_convert.dataset.index.DatasetIndex.order`, not sorted), every feature
    float32 ``[feature_dim]``. A format the index lists but this rela does not register
    is reported and its shards are not read. Checks ``keys.npy`` and ``pca.npz`` against
    their recorded SHA-256, that ``keys.npy`` holds distinct keys, and that the shard
    counts add up to ``num_samples`` in every format.

    Args:
        root: converted dataset folder, or its URL.

    Returns:
        ``(number of files checked, problems)``; each problem is one line starting
        with the name of the bad file; no problems means the dataset is intact.

    Raises:
        rela_convert.dataset.files.DatasetError: no usable ``index.json``.
        rela_convert.dataset.remote.RemoteError: (URL) the server keeps failing (after the retries).
    """
    root = dataset_root(root)
    index = DatasetIndex.load(root)
    problems, checked = [], 0
    small = _read_small_files(root, [index.keys_file] + ([index.pca["file"]] if index.pca else []))
    try:
        keys = np.load(io.BytesIO(small[index.keys_file]))
    except (KeyError, ValueError, EOFError, OSError):  # missing or damaged: reported with the hashes below
        keys = None
    if keys is not None and len(np.unique(keys)) != len(keys):
        problems.append(f"{index.keys_file}: {len(keys) - len(np.unique(keys))} keys appear more than once")
    for format, shards in index.formats.items():
        if format not in STORAGE_FORMATS:
            problems.append(
                f"index.json: unknown storage format {format!r} (this rela reads {', '.join(STORAGE_FORMATS.names())})"
            )
            continue
        start = 0
        for shard in shards:
            expected = None if keys is None else keys[start : start + shard["num_samples"]]
            problems += _verify_shard(root, shard, STORAGE_FORMATS.get(format), index.feature_dim, expected)
            start += shard["num_samples"]
            checked += 1
        total = sum(shard["num_samples"] for shard in shards)
        if total != index.num_samples:
            problems.append(
                f"index.json: the {format} shards hold {total} samples, num_samples says {index.num_samples}"
            )
    hashed = [(index.keys_file, index.keys_sha256)] + ([(index.pca["file"], index.pca["sha256"])] if index.pca else [])
    for name, expected in hashed:
        checked += 1
        if name not in small:
            problems.append(f"{name}: missing")
        elif hashlib.sha256(small[name]).hexdigest() != expected:
            problems.append(f"{name}: SHA-256 differs from the index's {expected}")
    return checked, problems


def _read_small_files(root: Path | RemoteFolder, names: list[str]) -> dict[str, bytes]:
    """The bytes of the small files ``names`` of the dataset (``keys.npy``, ``pca.npz``) that exist, unchecked."""
    found = {}
    for name in names:
        try:
            found[name] = root.read_bytes(name) if isinstance(root, RemoteFolder) else (root / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            pass
    return found
