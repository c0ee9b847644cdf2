"""Loopback servers for the tests: a free port, and a plain HTTP server of a folder that counts requests and can
fail a share of them (used by test_remote.py and test_many_runs.py; the ``serve`` fixture is in conftest.py)."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from collections import Counter
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class CountingServer(http.server.ThreadingHTTPServer):
    """Serves a folder; counts requests per (method, file name); with ``fail_every`` k, answers every k-th request
    with HTTP 503."""

    daemon_threads = True

    def __init__(self, folder: Path, fail_every: int = 0) -> None:
        handler = functools.partial(CountingHandler, directory=str(folder))
        super().__init__(("127.0.0.1", free_port()), handler)
        self.requests: Counter = Counter()
        self.failures = 0
        self.fail_every = fail_every
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, suffix: str = "") -> int:
        """GET requests of files whose name ends with ``suffix``."""
        return sum(
            count for (method, name), count in self.requests.items() if method == "GET" and name.endswith(suffix)
        )


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _failed(self) -> bool:
        server = self.server
        with server.lock:
            server.requests[(self.command, self.path.rsplit("/", 1)[-1])] += 1
            number = sum(server.requests.values())
            fail = bool(server.fail_every) and number % server.fail_every == 0
            server.failures += fail
        if fail:
            self.send_error(503, "Service Unavailable")
        return fail

    def do_GET(self) -> None:
        if not self._failed():
            super().do_GET()

    def do_HEAD(self) -> None:
        if not self._failed():
            super().do_HEAD()
