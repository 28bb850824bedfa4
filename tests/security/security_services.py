"""Services of the security tests, all on 127.0.0.1, all removed afterwards.

* :class:`CanaryRedis`: a ``redis-server`` of the test's own on a free port whose password is
  the canary (``--requirepass``), without persistence, in a ``mkdtemp`` directory.
* :class:`CanaryDatabase`: a throwaway database on the shared PostgreSQL, owned by a login
  role whose password is the canary. The server trusts local TCP connections, so the password
  is not checked, but it still travels in every URL studyq is given and must never show.
* :class:`Transcript`: every command the test ran and everything it printed.
* :func:`studyq`: the ``studyq`` CLI as a subprocess (a coordinator), with only the
  ``STUDYQ_*`` variables the test gives it.
* :class:`FlowerProcess`: ``studyq flower`` with basic auth, and its JSON API.
* :func:`postgres_dump` / :func:`redis_dump`: every stored value, as text to search.

The shared PostgreSQL comes from tests/_services.py, the worker helpers from
``tests/distributed/dist_services.py``. Every process is started here and signalled only by
the id recorded here.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from _services import HOST, PG_PORT, pg_execute, unavailable
from dist_services import REPO

CANARY_PREFIX = "CanaryS3cret-"
MASK = "***"


def make_canary() -> str:
    """A secret no program could print by accident: a fixed prefix and random hex."""
    return f"{CANARY_PREFIX}{secrets.token_hex(12)}"


def canary_forms(canary: str) -> list[str]:
    """The canary as it would appear written plainly, URL-quoted, in hex, or inside base64
    (Celery message bodies in Redis are base64): for each of the three alignments, the
    base64 characters that depend on the canary's bytes alone."""
    raw = canary.encode()
    forms = {canary, urllib.parse.quote(canary, safe=""), raw.hex()}
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode()
        first_group = -(-offset // 3)  # the first 3-byte group holding canary bytes only
        last_group = (offset + len(raw)) // 3  # groups from here on hold padding
        forms.add(encoded[first_group * 4 : last_group * 4])
    return sorted(form for form in forms if len(form) >= 16)


def find_canary(text: str, canary: str) -> list[str]:
    """Every form of the canary in ``text``, and its telling pieces: its start (a URL cut
    short after the password began) and any tail of 4 characters or more right before an
    ``@`` (a URL whose start was cut off, or masked up to the wrong ``@``)."""
    found = [form for form in canary_forms(canary) if form in text]
    if CANARY_PREFIX[:8] in text:
        found.append(CANARY_PREFIX[:8])
    found += [
        f"{canary[-size:]}@" for size in range(4, len(canary)) if f"{canary[-size:]}@" in text
    ][:1]
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _die_with_parent() -> None:
    """SIGTERM the child if pytest dies without tearing down (Linux ``PR_SET_PDEATHSIG``)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def _stop(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM the process this module started, SIGKILL if it is still there."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# -- Redis with the canary as its password -------------------------------------------------


class CanaryRedis:
    """``redis-server --requirepass <canary>`` on a free port, no persistence."""

    def __init__(self, password: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed (apt-get install redis-server)")
        self.password = password
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="studyq-security-redis-"))
        # The password goes in through a config file, not the command line (ps would show it).
        config = self.dir / "redis.conf"
        config.write_text(f"requirepass {password}\n", encoding="utf-8")
        config.chmod(0o600)
        with (self.dir / "redis.log").open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(binary), str(config),
                    *f"--port {self.port} --bind {HOST} --appendonly no --daemonize no".split(),
                    *("--save", ""), *("--dir", str(self.dir)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.client = redis.Redis(
            host=HOST, port=self.port, password=password, socket_connect_timeout=1
        )

        def ready() -> bool:
            try:
                return bool(self.client.ping())
            except redis.RedisError:
                assert self.process.poll() is None, f"redis-server died:\n{self.log}"
                return False

        wait_until(ready, 10, f"redis-server on port {self.port}")

    @property
    def log(self) -> str:
        return (self.dir / "redis.log").read_text(encoding="utf-8", errors="replace")

    def url(self, *, password: str | None = None, port: int | None = None) -> str:
        password = self.password if password is None else password
        return f"redis://:{password}@{HOST}:{port or self.port}/0"

    def masked_url(self) -> str:
        return f"redis://:{MASK}@{HOST}:{self.port}/0"

    def close(self) -> None:
        self.client.close()
        _stop(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- a PostgreSQL database owned by a role with the canary as its password -----------------


class CanaryDatabase:
    """Database ``studyq_canary_<pid>`` owned by login role ``studyq_canary_<pid>``, whose
    password is the canary; both are dropped by :meth:`close`."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.name = self.role = f"studyq_canary_{os.getpid()}"
        try:
            self._drop()  # what a crashed run may have left
            pg_execute(
                f"CREATE ROLE \"{self.role}\" LOGIN PASSWORD '{password}'",
                f'CREATE DATABASE "{self.name}" OWNER "{self.role}"',
            )
        except Exception as error:  # any failure to reach the server means "no PostgreSQL"
            unavailable(f"PostgreSQL at {HOST}:{PG_PORT} is not usable: {error}".splitlines()[0])

    def url(self, *, database: str | None = None, port: int = PG_PORT) -> str:
        name = database or self.name
        return f"postgresql://{self.role}:{self.password}@{HOST}:{port}/{name}"

    def masked_url(self) -> str:
        """The URL after the scheme, masked (the scheme depends on who printed it)."""
        return f"://{self.role}:{MASK}@{HOST}:{PG_PORT}/{self.name}"

    def _drop(self) -> None:
        pg_execute(
            f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)',
            f'DROP ROLE IF EXISTS "{self.role}"',
        )

    def close(self) -> None:
        self._drop()


# -- what the test ran and saw -------------------------------------------------------------


@dataclass
class Captured:
    """One command (or log, or artifact) and the text it produced."""

    what: str
    text: str
    returncode: int | None = None


@dataclass
class Transcript:
    """Everything the test captured, searched for the canary at the end."""

    items: list[Captured] = field(default_factory=list)

    def add(self, what: str, text: str, returncode: int | None = None) -> Captured:
        item = Captured(what, text, returncode)
        self.items.append(item)
        return item

    def containing(self, needle: str) -> list[str]:
        return [item.what for item in self.items if needle in item.text]


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """The test's environment without any ``STUDYQ_*`` / ``FLOWER_*`` variable, plus
    ``extra``: a command sees exactly the settings the test gives it."""
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("STUDYQ_", "FLOWER_", "CELERY_"))
    }
    environment.update(PYTHONUNBUFFERED="1", NO_COLOR="1")
    environment.update(extra)
    return environment


def studyq(
    transcript: Transcript,
    *args: str,
    env: Mapping[str, str],
    cwd: Path,
    timeout: float = 60.0,
) -> Captured:
    """Run ``studyq ARGS`` (``python -m orchestrator.cli``) and record its output."""
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        env=clean_environment({**env, "PYTHONPATH": str(REPO)}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return transcript.add(f"studyq {' '.join(args)}", output, result.returncode)


# -- Flower --------------------------------------------------------------------------------


class FlowerProcess:
    """``studyq flower`` on a free port of 127.0.0.1 with basic auth; log in a file."""

    def __init__(self, *, env: Mapping[str, str], log_dir: Path, cwd: Path) -> None:
        self.port = free_port()
        self.user = "lab"
        self.password = secrets.token_hex(8)
        self.log_path = log_dir / "flower.log"
        environment = clean_environment(
            {
                **env,
                "PYTHONPATH": str(REPO),
                "STUDYQ_FLOWER_BASIC_AUTH": f"{self.user}:{self.password}",
            }
        )
        with self.log_path.open("w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", "flower",
                 "--port", str(self.port), "--address", HOST],
                cwd=cwd,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def get(self, path: str, *, auth: bool = True, timeout: float = 10.0) -> tuple[int, str]:
        """``GET path``; returns the status and the body (also for error statuses)."""
        request = urllib.request.Request(f"http://{HOST}:{self.port}{path}")
        if auth:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode("utf-8", errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, f"flower exited early:\n{self.log}"
            try:
                return self.get("/healthcheck", auth=False, timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(ready, timeout, f"flower on port {self.port}")

    def tasks(self) -> dict[str, Any]:
        status, body = self.get("/api/tasks")
        assert status == 200, f"/api/tasks answered {status}: {body[:500]}"
        tasks: dict[str, Any] = json.loads(body)
        return tasks

    def terminate(self) -> int:
        _stop(self.process)
        return int(self.process.returncode)


# -- every stored value, as text -----------------------------------------------------------


def postgres_dump(database: str) -> str:
    """``pg_dump --data-only`` of ``database`` (as the server's superuser, over TCP)."""
    binary = shutil.which("pg_dump")
    if binary is None:
        unavailable("pg_dump is not installed (apt-get install postgresql-client)")
    result = subprocess.run(
        [str(binary), "--data-only", "--no-owner", "-h", HOST, "-p", str(PG_PORT),
         "-U", "postgres", "-d", database],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"pg_dump failed: {result.stderr}"
    return result.stdout


def redis_dump(client: redis.Redis) -> str:
    """Every key of every database of ``client``'s server with its value, one per line."""
    lines = []
    databases = int(client.config_get("databases").get("databases", 16))
    for db in range(databases):
        conn = client.connection_pool.connection_kwargs
        per_db = redis.Redis(
            host=conn["host"], port=conn["port"], password=conn.get("password"), db=db
        )
        with contextlib.closing(per_db):
            for key in per_db.scan_iter(count=1000):
                kind = per_db.type(key).decode()
                value: Any
                if kind == "string":
                    value = per_db.get(key)
                elif kind == "list":
                    value = per_db.lrange(key, 0, -1)
                elif kind == "hash":
                    value = per_db.hgetall(key)
                elif kind == "set":
                    value = sorted(per_db.smembers(key))
                elif kind == "zset":
                    value = per_db.zrange(key, 0, -1, withscores=True)
                elif kind == "stream":
                    value = per_db.xrange(key)
                else:
                    value = f"<{kind}>"
                lines.append(f"db{db} {key!r} {kind} {value!r}")
    return "\n".join(lines)


def command_lines(pids: list[int]) -> str:
    """What ``ps`` shows any user for these processes and their children (pool processes):
    ``/proc/<pid>/cmdline``, one process per line."""
    wanted = set(pids)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) in pids:
                wanted.add(int(stat.parent.name))
    lines = []
    for pid in sorted(wanted):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            lines.append(f"{pid}: {b' '.join(argv).decode(errors='replace')}")
    return "\n".join(lines)


def read_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }
