"""``rela inspect --verify`` proves a dataset intact and names every damaged file."""

from __future__ import annotations

import json
import shutil

import numpy as np
from click.testing import CliRunner

from cli import main
from rela_convert.dataset.files import sha256_file
from rela_convert.dataset.index import DatasetIndex
from rela_convert.dataset.verify import verify_dataset


def flip_byte(path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_names_each_bad_shard(converted_cifar, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(converted_cifar, data)
    runner = CliRunner()

    intact = runner.invoke(main, ["inspect", str(data), "--verify"])
    assert intact.exit_code == 0, intact.output
    assert "verified: 10 files intact" in intact.output  # 4 tar + 4 HDF5 shards, keys.npy, pca.npz

    tar, hdf5 = data / "shard-000001.tar", data / "shard-000002.h5"
    flip_byte(tar, tar.stat().st_size // 2)
    flip_byte(hdf5, hdf5.stat().st_size - 100)
    (data / "shard-000003.tar").unlink()
    damaged = runner.invoke(main, ["inspect", str(data), "--verify", "--json"])
    assert damaged.exit_code == 1
    report = json.loads(damaged.output)["verify"]
    assert report["ok"] is False and report["files_checked"] == 10
    bad_files = {problem.split(":")[0] for problem in report["problems"]}
    assert bad_files == {"shard-000001.tar", "shard-000002.h5", "shard-000003.tar"}
    assert any(problem.startswith("shard-000001.tar: SHA-256") for problem in report["problems"])
    assert "shard-000003.tar: missing" in report["problems"]

    text = runner.invoke(main, ["inspect", str(data), "--verify"])
    assert text.exit_code == 1 and text.output.count("BAD shard-000001.tar") >= 1


def test_verify_checks_counts_and_feature_shapes(converted_cifar, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(converted_cifar, data)
    index = DatasetIndex.load(data)
    index.formats["hdf5"][0]["num_samples"] = 65  # the file holds 64
    index.feature_dim = 65  # the features have 64 entries
    index.save(data)
    result = CliRunner().invoke(main, ["inspect", str(data), "--verify", "--json"])
    assert result.exit_code == 1
    problems = json.loads(result.output)["verify"]["problems"]
    assert "shard-000000.h5: 64 samples, the index says 65" in problems
    assert "index.json: the hdf5 shards hold 201 samples, num_samples says 200" in problems
    assert sum(problem.endswith("features are not float32 [65]") for problem in problems) == 8


def test_verify_checks_the_stored_key_order(converted_cifar, tmp_path):
    """Samples are stored in a seeded order, so keys inside a shard are not sorted; each shard's keys must
    be its slice of keys.npy, in order (shards are consecutive slices of keys.npy in index order)."""
    data = tmp_path / "data"
    shutil.copytree(converted_cifar, data)
    index = DatasetIndex.load(data)
    keys = np.load(data / "keys.npy")
    assert not np.array_equal(keys[:64], np.sort(keys[:64]))  # stored shuffled, and verify accepts it
    assert verify_dataset(data) == (10, [])

    # keys.npy rewritten with two keys swapped between shards 0 and 2 (and its SHA-256 updated): both
    # shards of both formats disagree with it, once each.
    swapped = keys.copy()
    swapped[[5, 130]] = swapped[[130, 5]]
    np.save(data / "keys.npy", swapped)
    index.keys_sha256 = sha256_file(data / "keys.npy")
    index.save(data)
    checked, problems = verify_dataset(data)
    assert checked == 10 and len(problems) == 4
    bad = {f"shard-00000{shard}.{ext}" for shard in (0, 2) for ext in ("tar", "h5")}
    assert {problem.split(":")[0] for problem in problems} == bad
    first = "shard-000000.h5: 1 keys differ from its slice of keys.npy"
    first += f" (first: sample 5 has key {keys[5]}, keys.npy {keys[130]})"
    assert any(problem.startswith(first) for problem in problems)

    # keys.npy intact, but the index lists two HDF5 shards in another order than they were stored.
    np.save(data / "keys.npy", keys)
    index.keys_sha256 = sha256_file(data / "keys.npy")
    shards = index.formats["hdf5"]
    shards[1], shards[2] = shards[2], shards[1]
    index.save(data)
    checked, problems = verify_dataset(data)
    assert [problem.split(":")[0] for problem in problems] == ["shard-000002.h5", "shard-000001.h5"]
    assert all("64 keys differ from its slice of keys.npy" in problem for problem in problems)

    # A key stored twice in keys.npy.
    duplicated = keys.copy()
    duplicated[199] = duplicated[0]
    np.save(data / "keys.npy", duplicated)
    assert "keys.npy: 1 keys appear more than once" in verify_dataset(data)[1]
