"""A command SIGKILLed mid-run leaves no process behind: every worker process rela starts (DataLoader workers of
``rela convert``, ``rela train`` and ``rela eval``, the processes of ``--nproc``) ends within 10 s of its parent.

Each command runs as ``python -m cli ...`` in its own session on real CIFAR-10 data; once all its worker processes
are up and working, the command's process is killed with SIGKILL, and every process that descended from it
(recorded from /proc before the kill) must be gone (or a zombie) 10 s later.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT, RESNET20, copy_images

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc")

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}
#: Seconds every descendant of a killed command has to end.
GRACE = 10


def process_table() -> dict[int, tuple[int, str, int]]:
    """Every process now: pid -> (parent pid, state letter, start time in clock ticks)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) "
            table[int(entry.name)] = (int(fields[1]), fields[0], int(fields[19]))
    return table


def descendants(pid: int) -> dict[int, int]:
    """The living descendants of ``pid``: pid -> start time (which tells a later process of the same pid apart)."""
    table = process_table()
    found, parents = {}, {pid}
    while parents:
        children = {child for child, (parent, state, _) in table.items() if parent in parents and state != "Z"}
        found.update({child: table[child][2] for child in children})
        parents = children
    return found


def alive(processes: dict[int, int]) -> list[int]:
    """Those of ``processes`` (pid -> start time) still running (a zombie has ended)."""
    table = process_table()
    return [pid for pid, start in processes.items() if pid in table and table[pid][1] != "Z" and table[pid][2] == start]


def kill_mid_run(arguments: list, workers: int, tmp_path: Path) -> tuple[dict[int, int], list[int]]:
    """Start ``rela ARGUMENTS`` in its own session, wait until it has ``workers`` descendant processes (and 2 s more
    of work, and its workers again), SIGKILL it; returns its descendants before the kill and those alive
    :data:`GRACE` s after."""
    log = (tmp_path / "output.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", *map(str, arguments)],
        cwd=PROJECT,
        env=ENVIRONMENT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def working() -> dict[int, int]:
        """The descendants once there are ``workers`` of them (DataLoader workers restart between epochs)."""
        deadline = time.monotonic() + 300
        while len(found := descendants(process.pid)) < workers and process.poll() is None:
            assert time.monotonic() < deadline, found
            time.sleep(0.05)
        assert process.poll() is None, (tmp_path / "output.log").read_text()[-3000:]
        return found

    before: dict[int, int] = {}
    try:
        working()
        time.sleep(2)
        before = working()
        process.kill()
        process.wait()
        deadline = time.monotonic() + GRACE
        while alive(before) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = alive(before)
        print(f"\nrela {arguments[0]}: {len(before)} processes under it when killed, {len(left)} left {GRACE} s later")
        return before, left
    finally:
        process.kill()
        for pid in alive(before):  # never leave one to the next test
            os.kill(pid, signal.SIGKILL)
        process.wait()
        log.close()


@pytest.fixture(scope="module")
def eval_run(converted_cifar, tmp_path_factory) -> Path:
    """A tiny trained run (MobileNet-V3-small, 6 steps) for ``rela eval``."""
    from rela_train.config import TrainConfig
    from rela_train.trainer import Trainer

    run = tmp_path_factory.mktemp("eval-run") / "run"
    config = TrainConfig(
        arch="mobilenet_v3_small", stem="imagenet", input_size=32, batch_size=16, epochs=1, data_ratio=0.5, workers=0
    )
    Trainer(converted_cifar, run, config).fit(progress=False)
    return run


def test_killed_conversion_leaves_no_worker(cifar_root, tmp_path):
    command = ["convert", cifar_root / "train", tmp_path / "data", "--prior", f"cifar-resnet:20:{RESNET20}"]
    before, left = kill_mid_run([*command, "--workers", "2", "--quiet"], 2, tmp_path)
    assert not left, f"{len(left)} of {len(before)} processes left {GRACE} s after SIGKILL"


def test_killed_conversion_in_two_processes_leaves_none(cifar_root, tmp_path):
    command = ["convert", cifar_root / "train", tmp_path / "data", "--prior", f"cifar-resnet:20:{RESNET20}"]
    before, left = kill_mid_run([*command, "--nproc", "2", "--workers", "1", "--quiet"], 4, tmp_path)
    assert not left, f"{len(left)} of {len(before)} processes left {GRACE} s after SIGKILL"


def test_killed_training_leaves_no_worker(converted_cifar, tmp_path):
    options = ["--epochs", "50", "--batch-size", "16", "--stem", "imagenet", "--arch", "mobilenet_v3_small"]
    command = ["train", converted_cifar, tmp_path / "run", *options, "--no-tensorboard", "--quiet"]
    before, left = kill_mid_run([*command, "--workers", "2"], 2, tmp_path)
    assert not left, f"{len(left)} of {len(before)} processes left {GRACE} s after SIGKILL"


def test_killed_evaluation_leaves_no_worker(eval_run, cifar_root, tmp_path):
    train_dir = copy_images(cifar_root / "train", tmp_path / "train", per_class=100)
    test_dir = copy_images(cifar_root / "test", tmp_path / "test", per_class=100)
    command = ["eval", eval_run, "--train-dir", train_dir, "--test-dir", test_dir, "--batch-size", "8", "--quiet"]
    before, left = kill_mid_run([*command, "--workers", "2", "--device", "cpu"], 2, tmp_path)
    assert not left, f"{len(left)} of {len(before)} processes left {GRACE} s after SIGKILL"
