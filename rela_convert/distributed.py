"""The processes of a multi-process conversion or training run, started by ``torchrun`` or by
``rela convert/train --nproc N`` (:func:`launch`, torch.distributed's elastic launcher).

Only small CPU values cross processes (counts and the float64 feature moments),
so the process group is always gloo, also on GPU nodes where each process runs
its prior on GPU ``LOCAL_RANK``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rela_convert.processes import die_with_parent


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
        nccl for GPU training) when ``WORLD_SIZE > 1`` or when ``torchrun`` started this one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ  # torchrun sets it, also for one process
        owns = launched and not dist.is_initialized()
        if owns:
            dist.init_process_group(backend)
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), owns)

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (several processes, or one started by ``torchrun``): training
        then runs under ``DistributedDataParallel`` (with ``SyncBatchNorm`` and NCCL on GPUs)."""
        return self.world > 1 or (dist.is_available() and dist.is_initialized())

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


class LaunchError(RuntimeError):
    """A process that :func:`launch` started failed; the message (one line) says which."""


def launch(nproc: int, entrypoint: Callable, *args) -> None:
    """Run ``entrypoint(*args)`` in ``nproc`` processes on this machine with torch.distributed's elastic
    launcher (as ``torchrun --standalone``: c10d rendezvous on localhost at a free port, no restarts)
    and wait for all of them.

    ``entrypoint`` must be a module-level function (the processes are spawned, so it and ``args`` are
    pickled). Each process runs it as a ``torchrun`` worker would: with ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, so :meth:`Ranks.from_environment` joins
    them, ``OMP_NUM_THREADS = cpu_count // nproc`` unless the variable is set, and the platform's
    default multiprocessing start method for its own workers (not the launcher's spawn). The launcher's
    own log lines are shown only when ``LOGLEVEL`` is set (torch's variable for them); a process that
    fails prints its own error.

    Raises:
        LaunchError: a process failed (exited non-zero or was killed); the others have been stopped.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        run_id=f"rela-{uuid.uuid4().hex}",
        max_restarts=0,
    )
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    loggers = [] if "LOGLEVEL" in os.environ else _launcher_loggers()
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, _worker)(entrypoint, *args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode < 0:
            raise LaunchError(f"process {rank} of {nproc} was killed by signal {-failure.exitcode}") from None
        raise LaunchError(
            f"process {rank} of {nproc} failed (exit status {failure.exitcode}; its error is above)"
        ) from None
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _worker(entrypoint: Callable, *args) -> None:
    """A process of :func:`launch`: ``entrypoint(*args)`` with the platform's default start method, as in a
    fresh interpreter (the launcher's spawn made spawn the default; DataLoader workers then fork, as under
    torchrun, so that objects of a fork context, such as the training stream's phase flag, reach them); it ends
    with the launching process, however that ends (:func:`~rela_convert.processes.die_with_parent`)."""
    die_with_parent()
    multiprocessing.set_start_method(None, force=True)
    try:
        entrypoint(*args)
    except Exception:
        traceback.print_exc()  # the launcher only records it (in a file, and in log lines shown with LOGLEVEL)
        raise


def _launcher_loggers() -> list[logging.Logger]:
    """The loggers of torch.distributed's elastic launcher and of the processes it starts (each has its own level)."""
    return [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing"))
    ]
