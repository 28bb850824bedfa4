"""The distributed tests' own helpers on top of tests/_services.py (which supplies
PostgreSQL, Redis and RabbitMQ): a cuttable TCP link, and ``celery worker`` processes.
Everything is on 127.0.0.1 and everything created is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from _services import HOST, PG_PORT, REDIS_DBS, redis_url
from _services import redis_client as _redis_client

__all__ = [
    "BROKER_URL",
    "HOST",
    "PG_PORT",
    "REDIS_DB",
    "REPO",
    "TcpLink",
    "WorkerPair",
    "WorkerProcess",
    "redis_client",
]

REDIS_DB = REDIS_DBS["distributed"]
"""A Redis database of its own; the tests still only delete keys they created."""
BROKER_URL = redis_url(REDIS_DB)
"""The Redis broker, for the tests that run on Redis only."""
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def redis_client() -> redis.Redis:
    """A client on the test database, or skip/fail when Redis is down."""
    return _redis_client(REDIS_DB)


class TcpLink:
    """A TCP forwarder to ``HOST:port`` that a test can cut and restore: a real outage.

    ``cut()`` closes every forwarded connection and stops listening (new connections are
    refused); ``restore()`` listens again on the same port.
    """

    def __init__(self, port: int) -> None:
        self.target = (HOST, port)
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._pump, name="tcp-link", daemon=True)
        self._thread.start()

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen(64)
        listener.settimeout(1)
        return listener

    def cut(self) -> None:
        with self._lock:
            self._selector.unregister(self._listener)
            self._listener.close()
            for sock in list(self._pairs):
                self._drop(sock)

    def restore(self) -> None:
        with self._lock:
            self._listener = self._listen(self.port)
            self._selector.register(self._listener, selectors.EVENT_READ, None)

    def close(self) -> None:
        self._stopped = True
        self._thread.join(timeout=5)
        with self._lock:
            for sock in list(self._pairs):
                self._drop(sock)
            self._listener.close()
        self._selector.close()

    def _drop(self, sock: socket.socket) -> None:
        peer = self._pairs.pop(sock, None)
        for item in (sock, peer):
            if item is None:
                continue
            self._pairs.pop(item, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(item)
            item.close()

    def _pump(self) -> None:
        while not self._stopped:
            with self._lock:
                events = self._selector.select(timeout=0.05)
                for key, _ in events:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock is self._listener:
                        self._accept()
                    elif sock in self._pairs:
                        self._forward(sock)
            time.sleep(0)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=3)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.settimeout(5)  # reads follow readiness; writes may wait for the peer
            self._selector.register(sock, selectors.EVENT_READ, None)
        self._pairs[client] = upstream
        self._pairs[upstream] = client

    def _forward(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        try:
            self._pairs[sock].sendall(data)
        except OSError:
            self._drop(sock)


def _die_with_parent() -> None:
    """If pytest dies without tearing down (a thread-method timeout ends it with
    ``os._exit``), its workers get SIGTERM instead of living on (Linux ``PR_SET_PDEATHSIG``)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


class WorkerProcess:
    """A real ``celery worker`` (or ``studyq worker``) subprocess with its log in a file.

    Only the process this object started is ever signalled; its pool children die with it
    (Celery sets their parent-death signal).
    """

    def __init__(
        self,
        name: str,
        *,
        queue: str,
        database_url: str,
        log_dir: Path,
        broker_url: str = BROKER_URL,
        concurrency: int = 2,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
        via_cli: bool = False,
    ) -> None:
        self.name = name
        self.nodename = f"{name}@{socket.gethostname()}"
        self.log_path = log_dir / f"{name}.log"
        environment = dict(os.environ)
        environment.update(
            STUDYQ_BROKER_URL=broker_url,
            STUDYQ_DATABASE_URL=database_url,
            PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]),
            PYTHONUNBUFFERED="1",
        )
        environment.update(env or {})
        flags = ["-Q", queue, "-c", str(concurrency), "-P", pool, "-l", "INFO", "-n", self.nodename]
        if via_cli:
            command = [sys.executable, "-m", "orchestrator.cli", "worker", *flags]
        else:
            command = [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.app",
                "worker",
                "--without-gossip",
                "--without-mingle",
                *flags,
            ]
        self._log = self.log_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"{self.nodename} ready." in self.log:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited early:\n{self.log}")
            time.sleep(0.1)
        raise AssertionError(f"worker {self.name} not ready after {timeout} s:\n{self.log}")

    def wait_for_log(self, needle: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log:
                return
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not in the log of {self.name}:\n{self.log}")

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM (warm shutdown), then SIGKILL if it is still there after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


@dataclass
class WorkerPair:
    """The session's two workers and their queue."""

    queue: str
    workers: list[WorkerProcess]

    @property
    def log(self) -> str:
        return "\n".join(worker.log for worker in self.workers)
