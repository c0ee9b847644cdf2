"""The processes of a multi-process conversion, started by ``torch.distributed.run``
(``torchrun``, or ``rela convert --nproc N``).

Only small CPU values cross processes (counts and the float64 feature moments),
so the process group is always gloo, also on GPU nodes where each process runs
its prior on GPU ``LOCAL_RANK``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import click
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the conversion processes.

    Attributes:
        rank: 0..world-1 (``RANK``).
        world: number of processes (``WORLD_SIZE``).
        local_rank: index on this node (``LOCAL_RANK``), the GPU it uses.
        owns_group: whether :meth:`from_environment` initialised the process group.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_environment(cls, backend: str = "gloo") -> "Ranks":
        """Read the torchrun environment; joins the process group (``backend``: gloo, or
        nccl for GPU training) when ``WORLD_SIZE > 1``."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        owns = world > 1 and not dist.is_initialized()
        if owns:
            dist.init_process_group(backend)
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), owns)

    def barrier(self) -> None:
        """Wait for every process (no-op for one process)."""
        if self.world > 1:
            dist.barrier()

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise ``sum`` or ``max`` of float64 ``values`` over all processes."""
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor.tolist()

    def close(self) -> None:
        """Leave the process group if this object joined it."""
        if self.owns_group:
            dist.destroy_process_group()


def command_line(context: click.Context, drop: tuple[str, ...]) -> list[str]:
    """The subcommand and parameters of a click invocation as an argument list, without ``drop``."""
    argv = [context.info_name]
    for parameter in context.command.params:
        value = context.params[parameter.name]
        if parameter.name in drop or value is None:
            continue
        if isinstance(parameter, click.Argument):
            argv.append(str(value))
        elif parameter.is_flag:
            argv += [parameter.opts[0]] if value else []
        else:
            argv += [parameter.opts[0], str(value)]
    return argv


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``rela <argv>`` on ``nproc`` local processes with ``torch.distributed.run``
    (standalone rendezvous on this host) and wait for them.

    Each process gets ``OMP_NUM_THREADS = cpu_count // nproc`` unless the variable is set.

    Returns:
        The launcher's exit status (non-zero when any process failed).
    """
    environment = dict(os.environ)
    environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cli",
        *argv,
    ]
    return subprocess.run(command, env=environment, check=False).returncode
