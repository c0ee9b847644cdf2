"""The CUDA paths (issue 20), run with ``pytest -m cuda`` on a GPU machine (``benchmarks/gpu/run.sh``): bf16
autocast conversion, ``--decode device``, ``--augment device``, training with an exact resume, a one-process NCCL
``DistributedDataParallel`` run with ``SyncBatchNorm``.

Without a GPU they are skipped, except under ``RELA_CUDA_TESTS_ON_CPU=1`` (the GPU check's ``--dry-run``, which CI
runs): then the same code runs on the CPU (float32, gloo, plain batch norm), so the tests cannot rot between the
rare GPU loans. Real data: CIFAR-10 and ImageNet JPEGs of ``../shared/data`` (or ``$RELA_SHARED``).
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from conftest import RESNET20, Killed, kill_at_step

from rela_convert.checkpoint import load_checkpoint
from rela_convert.config import ConvertOptions
from rela_convert.convert import convert
from rela_convert.dataset.formats import STORAGE_FORMATS
from rela_convert.dataset.index import DatasetIndex
from rela_train.config import TrainConfig
from rela_train.trainer import Trainer

pytestmark = pytest.mark.cuda

CIFAR_PRIOR = f"cifar-resnet:20:{RESNET20}"


@pytest.fixture(scope="module")
def device() -> str:
    """``cuda``, or ``cpu`` under ``RELA_CUDA_TESTS_ON_CPU=1``; skips otherwise."""
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # for the exact resume
        return "cuda"
    if os.environ.get("RELA_CUDA_TESTS_ON_CPU") == "1":
        return "cpu"
    pytest.skip("no CUDA device (RELA_CUDA_TESTS_ON_CPU=1 runs these tests on the CPU)")


def features(root: Path) -> np.ndarray:
    """The stored prior features of a converted dataset, float32 ``[N, D]`` in key order."""
    index = DatasetIndex.load(root)
    reader = STORAGE_FORMATS.get(index.storage)
    pairs = [reader.read_features(root / shard["name"]) for shard in index.shards()]
    keys = np.concatenate([keys for keys, _ in pairs])
    return np.concatenate([values for _, values in pairs])[np.argsort(keys, kind="stable")]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two float ``[N, D]`` arrays."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def converted(source: Path, out: Path, prior: str, device: str, decode: str = "cpu") -> np.ndarray:
    convert(
        source,
        out,
        prior,
        ConvertOptions(shard_size=64, batch_size=32, workers=2, device=device, decode=decode, progress=False),
    )
    return features(out)


def test_bf16_autocast_conversion_agrees_with_float32_on_the_cpu(device, small_cifar_tree, tmp_path):
    on_device = converted(small_cifar_tree, tmp_path / "device", CIFAR_PRIOR, device)
    on_cpu = converted(small_cifar_tree, tmp_path / "cpu", CIFAR_PRIOR, "cpu")
    assert on_device.shape == on_cpu.shape == (200, 64) and on_device.dtype == np.float32
    assert cosines(on_device, on_cpu).min() > 0.99  # bf16 keeps about 3 significant digits


def test_device_decode_agrees_with_cpu_decode(device, imagenet_sample, tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    for image in sorted(imagenet_sample.iterdir())[:24]:
        (source / image.name).symlink_to(image)
    prior = "rand:resnet18@224"
    on_device = converted(source, tmp_path / "device", prior, device, decode="device")
    on_cpu = converted(source, tmp_path / "cpu", prior, device, decode="cpu")
    assert on_device.shape == (24, 512)
    # nvJPEG and libjpeg differ in their IDCT and the resize differs in antialiasing: close, not equal.
    assert np.median(cosines(on_device, on_cpu)) > 0.98


def config(device: str, **options) -> TrainConfig:
    """A tiny run on ``device``: ResNet-18 (ImageNet stem: cheap on a CPU) at 32 px, batch 16, 6 steps per epoch,
    2 epochs, ReLA then BYOL."""
    options = {"epochs": 2, "data_ratio": 0.5, "workers": 2, "rela": "static:0.5", "storage": "webdataset", **options}
    return TrainConfig(
        arch="resnet18", stem="imagenet", input_size=32, batch_size=16, log_every=1, device=device, **options
    )


@pytest.mark.parametrize("augment", ["cpu", "device"])
def test_training_resumes_bit_identical_after_a_kill(device, converted_cifar, tmp_path, augment):
    whole = Trainer(converted_cifar, tmp_path / "whole", config(device, augment=augment))
    summary = whole.fit(progress=False)
    assert summary["steps"] == 12 and summary["switch_step"] == 6
    assert len(losses(tmp_path / "whole")) == 12 and all(map(math.isfinite, losses(tmp_path / "whole")))
    assert next(whole.model.parameters()).device.type == device
    killed = Trainer(converted_cifar, tmp_path / "run", config(device, augment=augment, save_every=1))
    kill_at_step(killed, 8)
    with pytest.raises(Killed):
        killed.fit(progress=False)
    assert load_checkpoint(tmp_path / "run")["step"] == 8
    Trainer(converted_cifar, tmp_path / "run", config(device, augment=augment)).fit(progress=False)
    final, expected = (load_checkpoint(run)["training"]["model"] for run in (tmp_path / "run", tmp_path / "whole"))
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def losses(run: Path) -> list[float]:
    """The training losses logged in ``RUN/metrics.jsonl``, one per step."""
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_one_process_ddp_with_sync_batch_norm(device, converted_cifar, tmp_path, monkeypatch):
    environment = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "TORCHELASTIC_RUN_ID": "test-cuda",
    }  # as torchrun --nproc 1 sets
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    trainer = Trainer(converted_cifar, tmp_path / "run", config(device, epochs=1))
    try:
        assert dist.is_initialized() and dist.get_backend() == ("nccl" if device == "cuda" else "gloo")
        synced = [m for m in trainer.model.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
        assert bool(synced) == (device == "cuda")  # PyTorch synchronises batch norm on GPUs only
        assert isinstance(trainer.forward, torch.nn.parallel.DistributedDataParallel)
        summary = trainer.fit(progress=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert summary["steps"] == 6 and summary["world_size"] == 1
    assert len(losses(tmp_path / "run")) == 6 and all(map(math.isfinite, losses(tmp_path / "run")))
