"""Worker processes that end with their parent, however the parent ends.

A DataLoader worker notices on its own that its parent is gone only when it next waits for work; one blocked on
a full pipe (the batches it made, which nobody reads any more) waits forever, holding its memory and the output
folder. Every process rela starts (DataLoader workers of ``rela convert``, ``rela train``, ``rela eval`` and
``rela study``; the processes ``--nproc`` starts) therefore calls :func:`die_with_parent` first: on Linux the kernel
then sends it SIGKILL when its parent ends (``prctl(PR_SET_PDEATHSIG)``), elsewhere a daemon thread checks its
parent's id every :data:`WATCH_INTERVAL` seconds and ends the process once it changed. Neither waits on a pipe.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time

#: prctl option: the signal the calling process gets when its parent ends (linux/prctl.h).
PR_SET_PDEATHSIG = 1
#: Seconds between two checks of the parent's id where prctl is missing (not Linux).
WATCH_INTERVAL = 0.5


def die_with_parent(worker_id: int | None = None) -> None:
    """End the calling process as soon as its parent ends (see the module docstring); nothing in a process that
    :mod:`multiprocessing` did not start (the main one). Usable as a DataLoader ``worker_init_fn`` (``worker_id``
    is unused).

    On Linux the death signal belongs to the parent's thread that started the process: start workers from a
    thread that lives as long as them (DataLoaders do: the iterating thread starts its workers).
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent.pid:  # the parent ended before the signal was asked for
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent.pid,), name="rela-parent-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """End this process (exit status 1, no clean-up: the parent that would wait for it is gone) once its parent's
    id is no longer ``parent``."""
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL)
    os._exit(1)
