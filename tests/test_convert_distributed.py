"""``rela convert --nproc 2`` (two CPU processes, gloo) makes the same dataset as one process."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner
from conftest import PROJECT, RESNET20, assert_same_conversion, copy_images

from cli import main


def test_two_processes_make_the_same_dataset(cifar_root, tmp_path):
    src = copy_images(cifar_root / "test", tmp_path / "src", per_class=6)  # 60 images
    (src / "cat" / "empty.jpg").write_bytes(b"")  # one skip, in one process's shard
    arguments = [
        "--prior",
        f"cifar-resnet:20:{RESNET20}",
        "--format",
        "both",
        "--shard-size",
        "7",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--quiet",
    ]
    two = subprocess.run(
        [sys.executable, "-m", "cli", "convert", str(src), str(tmp_path / "two"), *arguments, "--nproc", "2"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("60 converted, 1 skipped") == 1  # one summary, from process 0
    one = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "one"), *arguments])
    assert one.exit_code == 0, one.output

    assert_same_conversion(tmp_path / "one", tmp_path / "two", samples=60, shards=9)
