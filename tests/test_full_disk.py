"""A disk that fills costs nothing: ``rela convert``, ``rela train`` (at a checkpoint) and ``rela push`` writing into a
tmpfs too small for their output stop with one ``error:`` line naming the folder and the space needed (no traceback,
not even at exit from a half-written tar stream), leave what they wrote intact, and the same command resumes once
the tmpfs is made larger: to bytes identical to an uninterrupted conversion or push, to weights identical to an
uninterrupted run. Real data: the 200 CIFAR-10 images of ``small_cifar_tree`` and ``converted_cifar``.

Needs root (to mount a tmpfs), as CI runs; skipped otherwise.
"""

from __future__ import annotations

import contextlib
import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT, RESNET20

from rela_convert.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0, reason="mounts a tmpfs (root on Linux)"
)

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """``folder`` (created) as a tmpfs of ``size`` (mount's syntax: ``512k``) while the context lasts."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def resize(folder: Path, size: str) -> None:
    """Give the tmpfs at ``folder`` another size; what it holds stays."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def rela(*arguments) -> subprocess.CompletedProcess:
    """``rela ARGUMENTS`` in a new Python (what it prints at exit counts too)."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *map(str, arguments)],
        cwd=PROJECT,
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_full_disk_line(result: subprocess.CompletedProcess, folder: Path) -> str:
    """The command failed with one line on stderr, the ``error:`` of a full disk naming ``folder`` and the space
    needed; returns it."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "No space left on device" in lines[0], lines[0]
    assert f"{folder} needs about" in lines[0] and "MB more" in lines[0] and "MB free" in lines[0], lines[0]
    print(f"\n{lines[0]}")
    return lines[0]


def differing_files(one: Path, other: Path) -> list[str]:
    """The names of the files under ``one`` whose bytes differ from ``other``'s, or that only one holds."""
    names = [{str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()} for root in (one, other)]
    differ = {name for name in names[0] & names[1] if not filecmp.cmp(one / name, other / name, shallow=False)}
    return sorted(differ | (names[0] ^ names[1]))


@pytest.mark.parametrize("formats", ["webdataset", "both"])
def test_convert_into_a_full_disk_then_resume_to_identical_bytes(small_cifar_tree, tmp_path, formats):
    command = ["convert", small_cifar_tree, "--prior", f"cifar-resnet:20:{RESNET20}", "--format", formats]
    options = ["--shard-size", "64", "--workers", "2", "--quiet"]
    assert rela(command[0], command[1], tmp_path / "whole", *command[2:], *options).returncode == 0
    with tmpfs(tmp_path / "disk", "900k" if formats == "both" else "500k") as disk:
        out = disk / "data"
        line = assert_full_disk_line(rela(command[0], command[1], out, *command[2:], *options), out)
        partial = sorted(path.name for path in (out / ".partial").glob("shard-*.json"))
        assert not list(out.glob("*.tmp")) and 0 < len(partial) < 4, line  # some shards finished, no half one
        done = [path.name for path in out.glob("shard-*.*") if f"{path.name.split('.')[0]}.json" in partial]
        assert done and all(filecmp.cmp(out / name, tmp_path / "whole" / name, False) for name in done)
        resize(disk, "16m")
        resumed = rela(command[0], command[1], out, *command[2:], *options)
        assert resumed.returncode == 0, resumed.stderr
        assert differing_files(out, tmp_path / "whole") == []


def test_push_into_a_full_disk_then_resume_to_identical_bytes(converted_cifar, tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        target = disk / "pushed"
        assert_full_disk_line(rela("push", converted_cifar, target, "--quiet"), target)
        resize(disk, "16m")
        resumed = rela("push", converted_cifar, target, "--quiet")
        assert resumed.returncode == 0, resumed.stderr
        assert differing_files(converted_cifar, target) == [".rela-push.json"]


def test_train_whose_disk_fills_at_a_checkpoint_resumes_to_identical_weights(converted_cifar, tmp_path):
    options = ["--epochs", "2", "--batch-size", "16", "--data-ratio", "0.5", "--workers", "0", "--save-every", "2"]
    options += ["--arch", "mobilenet_v3_small", "--stem", "imagenet", "--storage", "webdataset", "--rela", "static:0.5"]
    options += ["--quiet"]
    whole = tmp_path / "whole"
    assert rela("train", converted_cifar, whole, *options).returncode == 0
    checkpoint = (whole / "checkpoint.pt").stat().st_size
    # Room for one checkpoint and the logs, not for the second one written next to it before replacing it.
    with tmpfs(tmp_path / "disk", f"{checkpoint * 3 // 2 // 1024}k") as disk:
        run = disk / "run"
        assert_full_disk_line(rela("train", converted_cifar, run, *options), run)
        assert not list(run.glob("*.tmp")) and load_checkpoint(run)["step"] == 2  # the last one intact
        resize(disk, f"{4 * checkpoint // 1024}k")
        resumed = rela("train", converted_cifar, run, *options)
        assert resumed.returncode == 0, resumed.stderr
        final, expected = (load_checkpoint(folder)["training"]["model"] for folder in (run, whole))
        assert final.keys() == expected.keys() and all(final[name].equal(expected[name]) for name in expected)


def test_a_full_shard_cache_is_one_line_then_the_same_command_trains(converted_cifar, serve, tmp_path):
    _, url, _ = serve(converted_cifar)
    options = ["--epochs", "1", "--batch-size", "16", "--data-ratio", "0.5", "--workers", "1", "--storage", "hdf5"]
    options += ["--arch", "mobilenet_v3_small", "--stem", "imagenet", "--rela", "off", "--quiet"]
    with tmpfs(tmp_path / "disk", "64k") as cache:  # smaller than a shard
        command = ["train", url, tmp_path / "run", *options, "--cache-dir", cache]
        line = assert_full_disk_line(rela(*command), cache / "tmp")
        assert "once fixed, run the same command again" in line and not list((cache / "tmp").iterdir())
        resize(cache, "16m")
        resumed = rela(*command)
        assert resumed.returncode == 0, resumed.stderr
        assert load_checkpoint(tmp_path / "run")["step"] == 100 // 16
