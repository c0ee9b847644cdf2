"""Resume: a conversion killed with SIGKILL mid-way and started again finishes the job
without redoing finished shards and leaves exactly the bytes of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from conftest import PROJECT, RESNET20, copy_images

from cli import main

PRIOR = "rand:resnet18@32"
SHARD_SIZE = 10


def arguments(src: Path, out: Path, prior: str = PRIOR) -> list[str]:
    return [
        "convert",
        str(src),
        str(out),
        "--prior",
        prior,
        "--format",
        "both",
        "--shard-size",
        str(SHARD_SIZE),
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--quiet",
    ]


def run(src: Path, out: Path, prior: str = PRIOR):
    """The same command in this process (saves the start-up of a new Python with torch)."""
    return CliRunner().invoke(main, arguments(src, out, prior))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_killed_conversion_resumes_to_identical_bytes(cifar_root, tmp_path):
    src = copy_images(cifar_root / "test", tmp_path / "src", per_class=6)  # 60 images, 6 shards
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    process = subprocess.Popen(
        [sys.executable, "-m", "cli", *arguments(src, killed)],
        cwd=PROJECT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first_record = killed / ".partial" / "shard-000000.json"
    deadline = time.monotonic() + 240
    while not first_record.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)  # the process and its DataLoader worker
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the conversion ended before it could be killed"
    finished = len(list((killed / ".partial").glob("shard-*.json")))
    assert 1 <= finished < 6 and not (killed / "index.json").exists()

    resumed = run(src, killed)
    assert resumed.exit_code == 0, resumed.output
    assert "60 converted, 0 skipped" in resumed.output
    assert f"this run: {60 - SHARD_SIZE * finished} images" in resumed.output  # finished shards not redone

    uninterrupted = run(src, whole)
    assert uninterrupted.exit_code == 0, uninterrupted.output
    expected = snapshot(whole)
    assert sorted(expected) == sorted(
        ["index.json", "keys.npy", "pca.npz", "skipped.jsonl"]
        + [f"shard-{shard:06d}.{ext}" for shard in range(6) for ext in ("tar", "h5")]
    )
    assert snapshot(killed) == expected  # byte for byte, temporary files and .partial gone

    mtimes = {path: path.stat().st_mtime_ns for path in killed.iterdir()}
    again = run(src, killed)
    assert again.exit_code == 0 and "already holds this conversion" in again.output and "nothing to do" in again.output
    assert {path: path.stat().st_mtime_ns for path in killed.iterdir()} == mtimes

    other = run(src, killed, prior=f"cifar-resnet:20:{RESNET20}")
    assert other.exit_code == 1
    assert "already holds a conversion made with other arguments (prior: 'rand:resnet18@32' there" in other.output
    assert "choose another OUT or delete it" in other.output
    assert snapshot(killed) == expected
