"""A run's metrics: ``RUN/metrics.jsonl`` and, when TensorBoard is on, event files in ``RUN/tensorboard/``.

Only rank 0 opens a :class:`MetricsLog`. Every record is one JSON line (the same records with or without
TensorBoard); TensorBoard gets each numeric field of a record as a scalar under the field's name at the
record's ``step`` (``loss``, ``rela_loss``, ``rho``, ``lr``, ``images_per_s``, ``monitor_knn_top1``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

from rela_convert.dataset.files import write_atomic

METRICS_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be imported (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsLog:
    """Appends records to ``RUN/metrics.jsonl`` (flushed after each) and mirrors them to TensorBoard.

    Args:
        run: the run folder (exists).
        tensorboard: also write TensorBoard event files to ``RUN/tensorboard/`` (needs the ``tensorboard``
            package; see :func:`tensorboard_available`).
    """

    def __init__(self, run: str | Path, tensorboard: bool = False) -> None:
        self.path = Path(run) / METRICS_NAME
        self.tensorboard_dir = Path(run) / TENSORBOARD_DIR
        self.tensorboard = tensorboard
        self._file = open(self.path, "a")
        self._writer = None  # opened at the first record, after truncate_after
        self._purge_step: int | None = None

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (a resumed run goes on from its checkpoint's step):
        from metrics.jsonl, and from TensorBoard's view of the run (``purge_step``). Call before
        the first :meth:`write`."""
        self._file.close()
        if self.path.is_file():
            kept = [
                line for line in self.path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step
            ]
            write_atomic(self.path, "".join(kept).encode())
        self._file = open(self.path, "a")
        self._purge_step = step + 1

    def write(self, record: dict) -> None:
        """Append ``record`` (JSON-serialisable, with an int ``step``) as one line, and its numeric fields
        other than ``step`` as TensorBoard scalars at ``record["step"]``."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if not self.tensorboard:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self._purge_step)
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(name, value, global_step=record["step"])

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
