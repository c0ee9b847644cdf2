"""Datasets at a URL (rela_convert/dataset/remote.py, push.py, shard_cache.py): ``rela push`` to a real S3 API (moto's
server, through the real s3fs client) and training, inspecting and selecting from ``s3://`` and ``http://`` URLs
(a plain ``http.server`` serving a copy of the dataset folder); both servers run on 127.0.0.1 at a free port,
started inside the tests. Data: ``converted_cifar`` (200 real CIFAR-10 images, both formats, 4 shards each)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _servers import free_port
from click.testing import CliRunner

from cli import main
from rela_convert.dataset import remote
from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.files import sha256_file
from rela_convert.dataset.index import DatasetIndex
from rela_convert.dataset.remote import RemoteFolder, is_transient, parse_bytes
from rela_convert.dataset.selection_file import load_selection
from rela_convert.dataset.shard_cache import ShardCache
from rela_convert.dataset.subset import key_mask
from rela_convert.push import MANIFEST_NAME
from rela_train.data.stream import TrainStream
from rela_train.methods.byol import BYOL

BUCKET = "rela-test"
TRAIN = ["--epochs", "1", "--batch-size", "16", "--stem", "imagenet", "--input-size", "32", "--workers", "0"]
TRAIN += ["--data-ratio", "0.5", "--quiet", "--no-tensorboard"]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with an empty bucket; yields the storage options that reach it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=options["endpoint_url"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    yield options
    server.stop()


@pytest.fixture
def storage_options(s3, monkeypatch):
    """The S3 server's storage options, also in RELA_STORAGE_OPTIONS (for in-process readers)."""
    text = json.dumps(s3)
    monkeypatch.setenv(remote.STORAGE_OPTIONS_VARIABLE, text)
    return text


@pytest.fixture(scope="module")
def pushed(s3, converted_cifar) -> str:
    """``converted_cifar`` pushed to s3://BUCKET/cifar by ``rela push`` (once per module); its URL."""
    url = f"s3://{BUCKET}/cifar"
    result = CliRunner().invoke(
        main, ["push", str(converted_cifar), url, "--quiet", "--storage-options", json.dumps(s3)]
    )
    assert result.exit_code == 0, result.output
    return url


def all_samples(dataset: ConvertedDataset) -> list[dict]:
    """Every stored sample, as the training stream reads them (through the shard cache or temporary files)."""
    stream = TrainStream(dataset, 32, BYOL.views(32), 0.5, 0, 16, verify_shards="first")
    mine = key_mask(dataset.keys, int(dataset.keys.max()))
    return list(stream.reader.read(list(range(len(dataset.shards))), mine, {}))


def epoch_batches(dataset: ConvertedDataset, workers: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """The batches (views, features, labels) of epoch 1 of a stream over ``dataset``."""
    stream = TrainStream(dataset, 32, BYOL.views(32), 0.5, 0, 16, verify_shards="first")
    stream.set_epoch(1)
    return list(stream.loader(workers))


def assert_same_data(local: ConvertedDataset, other: ConvertedDataset, workers: int = 0) -> None:
    assert np.array_equal(local.keys, other.keys)
    assert np.array_equal(local.pca.components, other.pca.components)
    first, second = all_samples(local), all_samples(other)
    assert len(first) == local.num_samples
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        assert (a["key"], a["image"], a["ext"], a["label"], a["relpath"]) == (
            b["key"],
            b["image"],
            b["ext"],
            b["label"],
            b["relpath"],
        )
        assert np.array_equal(a["feature"], b["feature"]) and a["feature"].dtype == b["feature"].dtype
    batches, remote_batches = epoch_batches(local, workers), epoch_batches(other, workers)
    assert len(batches) == len(remote_batches) == 6
    for a, b in zip(batches, remote_batches):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_push_uploads_index_last_and_skips_what_is_there(converted_cifar, s3, monkeypatch):
    written = []
    upload, write_bytes = RemoteFolder.upload, RemoteFolder.write_bytes

    def spy_upload(self, local, name, progress=None):
        written.append(name)
        return upload(self, local, name, progress)

    def spy_write(self, name, data):
        written.append(name)
        return write_bytes(self, name, data)

    monkeypatch.setattr(RemoteFolder, "upload", spy_upload)
    monkeypatch.setattr(RemoteFolder, "write_bytes", spy_write)
    url, options = f"s3://{BUCKET}/pushed", json.dumps(s3)
    result = CliRunner().invoke(main, ["push", str(converted_cifar), url, "--storage-options", options, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    local = sorted(path.name for path in converted_cifar.iterdir())
    assert summary["uploaded"] == summary["files"] == len(local) == 12  # 8 shards, keys, pca, skipped, index
    assert summary["bytes"] == sum(path.stat().st_size for path in converted_cifar.iterdir())
    data_files = [name for name in written if name != MANIFEST_NAME]
    assert data_files[-1] == "index.json" and sorted(data_files) == local
    folder = RemoteFolder(url, s3)
    assert folder.sizes(local) == {path.name: path.stat().st_size for path in converted_cifar.iterdir()}

    written.clear()  # idempotent: nothing is sent again
    again = CliRunner().invoke(main, ["push", str(converted_cifar), url, "--storage-options", options])
    assert again.exit_code == 0, again.output
    assert "0 of 12 files uploaded" in again.output and "12 already there" in again.output
    assert written == []

    # A shard truncated at the URL no longer has the size its recorded hash goes with: sent again, alone.
    name = DatasetIndex.load(converted_cifar).shards("webdataset")[1]["name"]
    folder.fs.pipe_file(folder.path_of(name), (converted_cifar / name).read_bytes()[:-512])
    written.clear()
    third = CliRunner().invoke(main, ["push", str(converted_cifar), url, "--storage-options", options, "--json"])
    assert third.exit_code == 0, third.output
    assert json.loads(third.stdout)["uploaded"] == 1  # the replaced shard only, not the unchanged index
    assert folder.read_bytes(name) == (converted_cifar / name).read_bytes()


@pytest.mark.parametrize("storage", ["hdf5", "webdataset"])
def test_stream_from_s3_is_byte_identical_to_the_local_read(converted_cifar, pushed, storage_options, storage):
    assert_same_data(ConvertedDataset(converted_cifar, storage), ConvertedDataset(pushed, storage))


def test_stream_from_http_is_byte_identical_with_workers(converted_cifar, serve):
    server, url, _ = serve(converted_cifar)
    dataset = ConvertedDataset(url)
    assert_same_data(ConvertedDataset(converted_cifar), dataset, workers=2)
    stream = TrainStream(dataset, 32, BYOL.views(32), 0.5, 0, 16)
    stream.set_epoch(1)
    plan = stream.plan()
    read = sum(len(plan.share(0, 1, worker, 2, 16)[1]) for worker in range(2))  # each worker: its own shards
    assert server.gets(".h5") == 4 + read  # all_samples, then the epoch's workers, each shard once per worker


def test_train_cli_from_s3_url(pushed, s3, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", pushed, str(run), *TRAIN, "--storage-options", json.dumps(s3)])
    assert result.exit_code == 0, result.output
    assert "trained 1 epochs" in result.output
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == pushed
    assert len(json.loads((run / "verified_shards.json").read_text())["shards"]) == 4


def test_second_run_reads_the_cache_and_the_limit_evicts(converted_cifar, serve, tmp_path, monkeypatch):
    server, url, _ = serve(converted_cifar)
    cache = tmp_path / "cache"
    first = CliRunner().invoke(main, ["train", url, str(tmp_path / "run1"), *TRAIN, "--cache-dir", str(cache)])
    assert first.exit_code == 0, first.output
    fetched = server.gets(".h5")
    assert fetched == 4 and len(ShardCache(cache).entries()) == 4
    second = CliRunner().invoke(main, ["train", url, str(tmp_path / "run2"), *TRAIN, "--cache-dir", str(cache)])
    assert second.exit_code == 0, second.output
    assert server.gets(".h5") == fetched  # every shard came from the cache
    assert not list((cache / "tmp").iterdir())

    # A cached copy damaged in place (same size) and one cut short are both dropped and fetched again.
    (_, _, damaged), (_, _, cut) = ShardCache(cache).entries()[:2]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:-100])
    third = CliRunner().invoke(main, ["train", url, str(tmp_path / "run3"), *TRAIN, "--cache-dir", str(cache)])
    assert third.exit_code == 0, third.output
    assert server.gets(".h5") == fetched + 2
    for _, _, path in ShardCache(cache).entries():
        assert sha256_file(path) == path.name.split("-", 1)[0]

    # A limit of 1.5 shards keeps at most one: every epoch fetches the others again.
    largest = max(shard["bytes"] for shard in DatasetIndex.load(converted_cifar).shards())
    monkeypatch.setenv(remote.CACHE_DIR_VARIABLE, str(tmp_path / "small"))
    monkeypatch.setenv(remote.CACHE_LIMIT_VARIABLE, str(int(1.5 * largest)))
    dataset = ConvertedDataset(url)
    before = server.gets(".h5")
    epoch_batches(dataset)
    entries = ShardCache(tmp_path / "small").entries()
    assert len(entries) == 1 and sum(size for _, size, _ in entries) <= 1.5 * largest
    epoch_batches(dataset)
    assert server.gets(".h5") - before >= 4 + 3


def test_a_server_failing_every_third_request_still_trains(converted_cifar, serve, tmp_path, monkeypatch):
    monkeypatch.setattr(remote, "RETRY_BACKOFF", 0.02)
    server, url, _ = serve(converted_cifar, fail_every=3)
    result = CliRunner().invoke(main, ["train", url, str(tmp_path / "run"), *TRAIN, "--storage", "webdataset"])
    assert result.exit_code == 0, result.output
    assert server.failures >= 3 and server.gets(".tar") >= 4


def test_a_shard_altered_on_the_server_is_fetched_again_then_refused(converted_cifar, serve, tmp_path):
    server, url, folder = serve(converted_cifar)
    name = DatasetIndex.load(converted_cifar).shards()[2]["name"]
    data = bytearray((folder / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    (folder / name).write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["train", url, str(tmp_path / "run"), *TRAIN])
    assert result.exit_code == 1
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"error: shard {url}/{name} does not match the size and SHA-256"), result.output
    assert "also when fetched again" in message
    assert server.gets(name) == 2
    assert not [path for path in Path(tempfile.gettempdir()).glob(f"rela-{os.getpid()}-*")]  # temporaries deleted

    verify = CliRunner().invoke(main, ["inspect", url, "--verify"])
    assert verify.exit_code == 1
    assert f"BAD {name}: SHA-256" in verify.output


def test_inspect_verify_and_select_at_a_url(pushed, storage_options, serve, converted_cifar):
    verify = CliRunner().invoke(main, ["inspect", pushed, "--verify", "--json"])
    assert verify.exit_code == 0, verify.output
    summary = json.loads(verify.output)
    assert summary["verify"] == {"files_checked": 10, "ok": True, "problems": []}
    assert summary["num_samples"] == 200

    selected = CliRunner().invoke(main, ["select", pushed, "--subset", "balanced", "--dedup-eps", "0.001", "--quiet"])
    assert selected.exit_code == 0, selected.output
    index = DatasetIndex.load(pushed)
    assert index.subset["strategy"] == "balanced"
    selection = load_selection(pushed, index)
    assert np.array_equal(selection.keys, ConvertedDataset(pushed).keys)

    _, url, _ = serve(converted_cifar)
    refused = CliRunner().invoke(main, ["select", url, "--subset", "balanced", "--storage-options", "{}"])
    assert refused.exit_code == 1 and "is read-only" in refused.output


def test_a_missing_remote_shard_is_named_before_training(converted_cifar, serve, tmp_path):
    _, url, folder = serve(converted_cifar)
    name = DatasetIndex.load(converted_cifar).shards()[3]["name"]
    (folder / name).unlink()
    result = CliRunner().invoke(main, ["train", url, str(tmp_path / "run"), *TRAIN])
    assert result.exit_code == 1
    assert f"is damaged: shard {name} is missing; run rela inspect" in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_transient_errors_are_told_from_permanent_ones():
    import aiohttp

    def status(code: int) -> aiohttp.ClientResponseError:
        return aiohttp.ClientResponseError(None, (), status=code)

    assert is_transient(status(503)) and is_transient(status(500)) and is_transient(status(429))
    assert not is_transient(status(404)) and not is_transient(status(403))
    wrapped = FileNotFoundError("https://host/x")  # fsspec's HTTP info: a failed HEAD + GET
    wrapped.__cause__ = status(503)
    assert is_transient(wrapped)
    wrapped.__cause__ = status(404)
    assert not is_transient(wrapped)
    assert is_transient(TimeoutError()) and is_transient(ConnectionResetError())
    assert is_transient(aiohttp.ServerDisconnectedError()) and is_transient(aiohttp.ClientPayloadError("cut"))
    assert not is_transient(PermissionError()) and not is_transient(ValueError("bad"))
    assert parse_bytes("50G") == 50 << 30 and parse_bytes("1.5MiB") == 3 << 19 and parse_bytes("1000") == 1000
    assert parse_bytes("0") is None and parse_bytes(None) is None
    with pytest.raises(ValueError):
        parse_bytes("lots")
