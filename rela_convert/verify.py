"""Proving a converted dataset intact against its ``index.json`` (``rela inspect --verify``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rela_convert.formats import STORAGE_FORMATS, StorageFormat
from rela_convert.hashing import sha256_file
from rela_convert.index import DatasetIndex, ShardRecord


def _verify_shard(
    root: Path, shard: ShardRecord, format: type[StorageFormat], feature_dim: int, expected_keys: np.ndarray | None
) -> list[str]:
    name, path = shard["name"], root / shard["name"]
    if not path.is_file():
        return [f"{name}: missing"]
    problems = []
    if path.stat().st_size != shard["bytes"]:
        problems.append(f"{name}: {path.stat().st_size} bytes, the index says {shard['bytes']}")
    digest = sha256_file(path)
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


def verify_dataset(root: str | Path) -> tuple[int, list[str]]:
    """Re-hash and re-read every shard of every storage format listed in the index.

    Checks per shard: present, byte size and SHA-256 as recorded, readable, sample count,
    its keys in order equal to its slice of ``keys.npy`` (the shards of every format, in
    index order, are consecutive slices of ``keys.npy``: samples are stored in the seeded
    order of :attr:`~rela_convert.index.DatasetIndex.order`, not sorted), every feature
    float32 ``[feature_dim]``. A format the index lists but this rela does not register
    is reported and its shards are not read. Checks ``keys.npy`` and ``pca.npz`` against
    their recorded SHA-256, that ``keys.npy`` holds distinct keys, and that the shard
    counts add up to ``num_samples`` in every format.

    Args:
        root: converted dataset folder.

    Returns:
        ``(number of files checked, problems)``; each problem is one line starting
        with the name of the bad file; no problems means the dataset is intact.

    Raises:
        rela_convert.index.DatasetError: no usable ``index.json``.
    """
    root = Path(root)
    index = DatasetIndex.load(root)
    problems, checked = [], 0
    try:
        keys = np.load(root / index.keys_file)
    except (OSError, ValueError, EOFError):  # missing or damaged: reported with the hashes below
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
        path = root / name
        checked += 1
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name}: SHA-256 differs from the index's {expected}")
    return checked, problems
