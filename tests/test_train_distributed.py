"""Two training processes (DistributedDataParallel, gloo on CPU) on real converted CIFAR-10 shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import PROJECT

from rela_convert.checkpoint import load_backbone


def test_two_process_training(converted_cifar, tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "cli",
        "train",
        str(converted_cifar),
        str(run),
        "--nproc",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--data-ratio",
        "0.5",
        "--workers",
        "1",
        "--rela",
        "static:0.5",
        "--log-every",
        "1",
        "--storage",
        "hdf5",
        "--quiet",
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=PROJECT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps_per_epoch = 100 // (2 * 8)  # floor(0.5 x 200) samples over 2 ranks x batch 8
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 2 * steps_per_epoch + 1))  # one line per step: rank 0 only
    assert all(line["images_per_s"] > 0 for line in lines)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 * steps_per_epoch
    assert summary["switch_step"] == steps_per_epoch
    backbone, input_size = load_backbone(run)
    assert input_size == 32
    with torch.no_grad():
        assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 512)


def test_a_failing_process_fails_the_launch_with_a_one_line_error(converted_cifar, tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("LOGLEVEL", None)
    # Not a converted dataset: refused once, before any process is started.
    command = [sys.executable, "-m", "cli", "train", str(tmp_path), str(tmp_path / "run"), "--nproc", "2"]
    result = subprocess.run(command, cwd=PROJECT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path} has no index.json: not a converted dataset, or its conversion has not finished "
        "(run rela convert again to resume)"
    ]
    # A misspelt --rela is found by each process.
    command = [sys.executable, "-m", "cli", "train", str(converted_cifar), str(tmp_path / "run"), "--nproc", "2"]
    result = subprocess.run(
        command + ["--rela", "sometimes"], cwd=PROJECT, env=environment, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), result.stderr  # no launcher log or traceback
    assert len(lines) == 3 and lines[0] == lines[1]  # each process says why (the --rela spelling), then:
    assert lines[-1].startswith("error: process ") and lines[-1].endswith(
        " of 2 failed (exit status 1; its error is above)"
    )
