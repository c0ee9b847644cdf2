"""How a run stops: :class:`TrainingError` (it cannot start, resume or go on; one line says why),
:class:`TrainingInterrupted` (SIGTERM or SIGINT stopped it after a step, once saved) and :class:`StopSignals`, the
handlers that turn those signals into a stop after the current step."""

from __future__ import annotations

import signal
import threading


class TrainingError(RuntimeError):
    """The run cannot start, resume or go on; the message (one line) says why."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT stopped the run after a step, once its checkpoint was saved.

    Attributes:
        signal: the signal's number; ``exit_status`` is ``128 + signal`` (143 for SIGTERM, 130 for SIGINT),
            the status ``rela train`` exits with.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signal = signum
        self.exit_status = 128 + signum


class StopSignals:
    """While active (a context manager; handlers are installed from the main thread only), SIGTERM and SIGINT
    set :attr:`received` (the signal's number) for the training loop, which stops after its step; a second
    signal raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}
