"""Many runs, one dataset (docs/cluster.md): three ``rela train`` processes started at once on one dataset, at a URL
(a loopback HTTP server failing a share of its requests) with one shared ``--cache-dir`` smaller than the dataset,
or in a local folder that none of them may write. Data: ``converted_cifar`` (200 real CIFAR-10 images, 4 shards per
format); tiny deterministic ResNet-18 runs (one thread each), so that equal weights mean equal samples read."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import PROJECT

from rela_convert.checkpoint import load_checkpoint
from rela_convert.dataset.files import sha256_file
from rela_convert.dataset.index import DatasetIndex
from rela_convert.dataset.shard_cache import TEMPORARY_FOLDER, ShardCache

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}
RUNS = 3


def train_command(data: str | Path, run: Path, *extra: str) -> list[str]:
    return [
        *(sys.executable, "-m", "cli", "train", str(data), str(run), "--epochs", "1", "--batch-size", "16"),
        *("--data-ratio", "0.5", "--rela", "static:1", "--stem", "imagenet", "--input-size", "32", "--workers", "0"),
        *("--storage", "hdf5", "--log-every", "1", "--no-tensorboard", "--quiet", *extra),
    ]


def train_at_once(commands: list[list[str]]) -> list[int]:
    """Start every command at once and wait for all; each must succeed. Returns their process ids."""
    processes = [
        subprocess.Popen(command, cwd=PROJECT, env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for command in commands
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr.decode()[-3000:]
    return [process.pid for process in processes]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run)["training"]["model"]


def assert_same_weights(run: Path, expected: dict[str, torch.Tensor]) -> None:
    """The run trained on the samples of the local read, byte for byte (its weights are the local run's, bit for
    bit: any other image or feature byte would change them)."""
    final = weights(run)
    assert final.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(final[name], expected[name])] == []


@pytest.fixture(scope="module")
def local_weights(converted_cifar, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the same run alone on the local dataset."""
    run = tmp_path_factory.mktemp("alone") / "run"
    train_at_once([train_command(converted_cifar, run)])
    return weights(run)


def test_three_runs_share_one_url_and_one_cache_smaller_than_the_dataset(
    converted_cifar, serve, local_weights, tmp_path
):
    server, url, _ = serve(converted_cifar, fail_every=4)  # a quarter of the requests fail (HTTP 503)
    shards = DatasetIndex.load(converted_cifar).shards("hdf5")
    limit = int(2.5 * max(shard["bytes"] for shard in shards))
    assert limit < sum(shard["bytes"] for shard in shards)
    cache = tmp_path / "cache"
    runs = [tmp_path / f"run{number}" for number in range(RUNS)]
    pids = train_at_once(
        [train_command(url, run, "--cache-dir", str(cache), "--cache-limit", str(limit)) for run in runs]
    )
    assert server.failures > 0
    for run in runs:
        assert_same_weights(run, local_weights)
    # The cache ends within its limit, each entry whole (the SHA-256 its name records), no download left in tmp/,
    # and no entry locked (an exclusive lock on each is granted at once).
    entries = ShardCache(cache).entries()
    assert entries and sum(size for _, size, _ in entries) <= limit
    recorded = {shard["sha256"]: shard["name"] for shard in shards}
    for _, _, path in entries:
        digest, name = path.name.split("-", 1)
        assert recorded[digest] == name and sha256_file(path) == digest
        with open(path, "rb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not [path for path in (cache / TEMPORARY_FOLDER).glob("*")]
    assert not [path for pid in pids for path in Path(tempfile.gettempdir()).glob(f"rela-{pid}-*")]  # nor in $TMPDIR


def tree_state(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its mode, size, modification time and (files) SHA-256."""
    state = {}
    for path in sorted([root, *root.rglob("*")]):
        status = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        state[str(path.relative_to(root))] = (status.st_mode, status.st_size, status.st_mtime_ns, digest)
    return state


@contextlib.contextmanager
def read_only(root: Path):
    """``root`` made read-only (folders 0o555, files 0o444) for the block, then writable again (so it can be
    removed). As root, permissions do not stop writes: the tree's state is compared as well."""
    paths = [root, *root.rglob("*")]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        yield
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_three_runs_on_one_local_dataset_write_nothing_under_it(converted_cifar, local_weights, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(converted_cifar, data)
    with read_only(data):
        before = tree_state(data)
        runs = [tmp_path / f"run{number}" for number in range(RUNS)]
        train_at_once([train_command(data, run) for run in runs])
        assert tree_state(data) == before
    for run in runs:
        assert_same_weights(run, local_weights)
