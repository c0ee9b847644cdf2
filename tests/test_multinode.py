"""Several machines with torch.distributed's own launcher: ``torchrun --nnodes 2 --rdzv-backend c10d`` started as two
separate launcher processes ("nodes" of one process each) on the loopback address, for ``rela convert`` and ``rela
train`` (docs/cluster.md). Real CIFAR-10 JPEGs and the CIFAR ResNet-20 prior; tiny ResNet-18 runs at 32 px."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from _servers import free_port
from click.testing import CliRunner
from conftest import PROJECT, RESNET20, assert_same_conversion, copy_images

from cli import main
from rela_convert.checkpoint import load_checkpoint

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}


def node_command(node_rank: int, port: int, run_id: str, *arguments: str, nodes: int = 2) -> list[str]:
    """The command of node ``node_rank``: torchrun (``python -m torch.distributed.run``) with one process on this
    node, c10d rendezvous at 127.0.0.1:``port`` (hosted by node 0's launcher), running ``rela ARGUMENTS``."""
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", "1"),
        *("--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"),
        *("--rdzv-id", run_id, "--rdzv-conf", f"is_host={int(node_rank == 0)}", "--local-addr", "127.0.0.1"),
        *("--max-restarts", "0", "-m", "cli", *arguments),
    ]


def start_nodes(*arguments: str, nodes: int = 2) -> list[subprocess.Popen]:
    """Start ``nodes`` launcher processes, node 0 (the rendezvous host) first; their output goes to temporary files
    (not pipes, which a node could fill while the test waits for another)."""
    port, run_id = free_port(), f"test-{uuid.uuid4().hex[:8]}"
    processes = []
    for rank in range(nodes):
        outputs = (tempfile.TemporaryFile(), tempfile.TemporaryFile())
        command = node_command(rank, port, run_id, *arguments, nodes=nodes)
        process = subprocess.Popen(command, cwd=PROJECT, env=ENVIRONMENT, stdout=outputs[0], stderr=outputs[1])
        process.outputs = outputs  # read by wait_nodes
        processes.append(process)
    return processes


def descendants(pid: int) -> list[int]:
    """The processes started by ``pid``, and by them, and so on (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, pending = [], [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found += below
        pending += below
    return found


def kill_node(process: subprocess.Popen) -> None:
    """SIGKILL a node: its launcher and every process under it (torchrun starts each worker in a session of its
    own, so a process group is not enough), as when the machine dies."""
    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def wait_nodes(processes: list[subprocess.Popen], timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Wait for every node (killing the ones still running after ``timeout`` seconds); their output as text."""
    deadline, done = time.monotonic() + timeout, []
    for process in processes:
        try:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_node(process)
            process.wait()
        outputs = []
        for stream in process.outputs:
            stream.seek(0)
            outputs.append(stream.read().decode(errors="replace"))
            stream.close()
        done.append(subprocess.CompletedProcess(process.args, process.returncode, *outputs))
    return done


def run_nodes(*arguments: str) -> list[subprocess.CompletedProcess]:
    results = wait_nodes(start_nodes(*arguments))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results


def test_two_nodes_convert_the_dataset_of_one_process(cifar_root, tmp_path):
    src = copy_images(cifar_root / "test", tmp_path / "src", per_class=6)  # 60 images
    (src / "cat" / "empty.jpg").write_bytes(b"")  # one skip, in one node's shard
    options = ["--prior", f"cifar-resnet:20:{RESNET20}", "--format", "both", "--shard-size", "7"]
    options += ["--batch-size", "4", "--workers", "1", "--quiet"]
    nodes = run_nodes("convert", str(src), str(tmp_path / "two"), *options)
    assert [result.stdout.count("60 converted, 1 skipped") for result in nodes] == [1, 0]  # the summary: rank 0's
    one = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "one"), *options])
    assert one.exit_code == 0, one.output
    assert_same_conversion(tmp_path / "one", tmp_path / "two", samples=60, shards=9)


# ----------------------------------------------------------------------------------------------------------------
# Training: 2 nodes x batch 8 take the steps of one process of batch 16; a node killed, the job restarted, resumes


STEPS = 100 // 16  # per epoch: floor(0.5 x 200 samples) // (2 ranks x 8), or // (1 rank x 16)


def train_arguments(data: Path, run: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        *("train", str(data), str(run), "--epochs", "2", "--batch-size", str(batch_size), "--data-ratio", "0.5"),
        *("--workers", "1", "--rela", "static:0.5", "--stem", "imagenet", "--storage", "hdf5", "--log-every", "1"),
        *("--no-tensorboard", "--quiet", *extra),
    ]


def logged_steps(run: Path) -> list[int]:
    steps = []
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:  # a line being written
            pass
    return steps


def test_two_nodes_train_like_one_process_of_twice_the_batch_and_resume_exactly_after_a_node_dies(
    converted_cifar, tmp_path
):
    one = subprocess.run(
        [sys.executable, "-m", "cli", *train_arguments(converted_cifar, tmp_path / "one", 16)],
        cwd=PROJECT,
        env=ENVIRONMENT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    whole = tmp_path / "two"
    run_nodes(*train_arguments(converted_cifar, whole, 8))
    summary = {run: json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")}
    assert summary["one"]["steps"] == summary["two"]["steps"] == 2 * STEPS
    assert (summary["one"]["world_size"], summary["two"]["world_size"]) == (1, 2)
    assert logged_steps(whole) == list(range(1, 2 * STEPS + 1))  # one line per step: rank 0 only

    # Node 1 dies (SIGKILL to its launcher, its worker and the loader workers) after step 3; node 0 then fails too
    # (or is stopped, as srun --kill-on-bad-exit does on a cluster).
    run = tmp_path / "killed"
    processes = start_nodes(*train_arguments(converted_cifar, run, 8, "--save-every", "2"))
    deadline = time.monotonic() + 300
    while max(logged_steps(run), default=0) < 3 and processes[0].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert processes[1].poll() is None, wait_nodes(processes)[1].stderr[-3000:]
    kill_node(processes[1])
    killed = wait_nodes(processes, timeout=240)
    assert killed[1].returncode == -signal.SIGKILL
    assert killed[0].returncode > 0, killed[0].stderr[-3000:]  # failed on its own (not stopped by wait_nodes)
    saved = load_checkpoint(run)
    assert saved["epoch"] == 0 and saved["step"] in (2, 4)  # within the first epoch
    # The job restarted (the same command on both nodes, a new rendezvous) ends with the uninterrupted run's weights.
    run_nodes(*train_arguments(converted_cifar, run, 8, "--save-every", "2"))
    final, expected = load_checkpoint(run)["training"]["model"], load_checkpoint(whole)["training"]["model"]
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[name], expected[name]) for name in expected)
    assert logged_steps(run) == list(range(1, 2 * STEPS + 1))
    assert json.loads((run / "summary.json").read_text())["steps"] == 2 * STEPS


def test_two_nodes_list_every_unusable_sample_once_written_by_rank_0(damaged_cifar, tmp_path):
    # Each node once appended its own lines to RUN/skipped.jsonl, which is not atomic on NFS across machines:
    # the records are now gathered to rank 0, which alone writes them (rela_train.run_state.RunFolder.write_skipped).
    data, shards = damaged_cifar
    run = tmp_path / "run"
    arguments = train_arguments(data, run, 8, "--epochs", "1", "--storage", "webdataset", "--max-bad", "0.05")
    run_nodes(*arguments)
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert sorted((record["key"], record["shard"]) for record in skipped) == sorted(shards.items())
    assert sorted(record["rank"] for record in skipped) == [0, 1]  # one found by each node, both written by rank 0
    assert all(record["epoch"] == 0 for record in skipped)
    assert json.loads((run / "summary.json").read_text())["bad_samples"] == 2


# ----------------------------------------------------------------------------------------------------------------
# The SLURM example (pipelines/imagenet1k-slurm.sh), run as a 2-node job on this machine with SLURM faked

FAKE_SRUN = r"""#!/usr/bin/env bash
# srun for a job of one task per node, on one machine: the command once per node (--nodes=N, else SLURM_NNODES),
# at once, each with the SLURM_NODEID, SLURM_PROCID and SLURM_LOCALID that srun sets; fails when one fails.
nodes=$SLURM_NNODES
while [[ $1 == -* ]]; do
    case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
    shift
done
pids=()
for ((node = 0; node < nodes; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_NTASKS=$nodes "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# scontrol show hostnames LIST (a comma-separated list here): one name a line.
[ "$1 $2" = "show hostnames" ] && tr , '\n' <<< "$3"
"""


def test_the_slurm_script_converts_trains_and_evaluates_on_two_nodes(
    small_cifar_tree, converted_cifar, cifar_root, tmp_path
):
    fake = tmp_path / "bin"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    config = tmp_path / "tiny.toml"  # pipelines/imagenet1k.toml's keys at CIFAR scale
    config.write_text(
        f'[convert]\nprior = "cifar-resnet:20:{RESNET20}"\nformat = "both"\nshard-size = 64\nbatch-size = 50\n'
        '[train]\narch = "resnet18"\nstem = "imagenet"\nmethod = "byol"\nrela = "static:0.5"\nepochs = 2\n'
        'batch-size = 8\ninput-size = 32\ndevice = "cpu"\ntensorboard = false\nquiet = true\n'
    )
    out = tmp_path / "out"
    slurm = {name: value for name, value in ENVIRONMENT.items() if not name.startswith("SLURM_")}
    environment = {
        **slurm,
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        **{"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2"},
        **{"SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1", "SLURM_SUBMIT_DIR": str(PROJECT)},
        **{"PYTHON": sys.executable, "CONFIG": str(config), "OUT": str(out), "RDZV_PORT": str(free_port())},
        **{"IMAGENET_TRAIN": str(small_cifar_tree), "WORKERS": "1", "KNN_K": "5", "PROBE_EPOCHS": "0"},
        "IMAGENET_VAL": str(copy_images(cifar_root / "test", tmp_path / "val", per_class=5)),
    }
    result = subprocess.run(
        ["bash", str(PROJECT / "pipelines" / "imagenet1k-slurm.sh")],
        cwd=tmp_path,  # sbatch runs a copy of the script elsewhere; the script goes to SLURM_SUBMIT_DIR
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Conversion: the dataset of one process; training: 2 ranks, the steps of its options, to the end.
    assert_same_conversion(converted_cifar, out / "data", samples=200, shards=4)
    summary = json.loads((out / "run-r0.5" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 * (100 // 16)
    evaluation = json.loads((out / "eval-r0.5.json").read_text())
    assert evaluation["num_test"] == 50 and 0 <= evaluation["knn_top1"] <= 1
