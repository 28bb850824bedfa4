"""A real PgBouncer (Debian's ``pgbouncer`` package) in front of the shared PostgreSQL.

:class:`PgBouncer` starts one ``pgbouncer`` process on a free port of 127.0.0.1 with an ini
generated in a ``mkdtemp`` directory: ``pool_mode = transaction`` (what deploy/ ships), trust
auth through an ``auth_file`` that lists ``postgres``, no Unix socket, the admin console on
the same port (database ``pgbouncer``). The process is ended by the pid this module recorded,
and its directory removed. :func:`pgbouncer` is the context manager the fixtures use.

PgBouncer refuses to run as root, so when the tests run as root (CI's container) it is
started with ``-u postgres``; the directory is made readable for that user.

Version 1.18 (Debian 12) has no protocol-level prepared statements in transaction mode: the
URLs handed out carry ``prepare_threshold=none`` (``orchestrator.store.engine``), as a user's
would.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _services import HOST, PG_PORT, unavailable

__all__ = ["PgBouncer", "pgbouncer", "require_pgbouncer"]

DEFAULT_POOL_SIZE = 20
"""Server connections per (database, user) pair: modest, because the machine's PostgreSQL
(``max_connections = 100``) also serves the other test sessions."""


def require_pgbouncer() -> str:
    """The ``pgbouncer`` binary, or skip (fail in CI) when it is not installed."""
    binary = shutil.which("pgbouncer") or shutil.which("/usr/sbin/pgbouncer")
    if binary is None:
        unavailable("pgbouncer is not installed (apt-get install pgbouncer)")
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class PgBouncer:
    """One ``pgbouncer`` process in transaction mode in front of ``HOST:PG_PORT``."""

    def __init__(
        self,
        *,
        default_pool_size: int = DEFAULT_POOL_SIZE,
        max_client_conn: int = 1000,
        server_port: int = PG_PORT,
    ) -> None:
        binary = require_pgbouncer()
        self.port = _free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="studyq-pgbouncer-"))
        self.directory.chmod(0o755)
        self.log_path = self.directory / "pgbouncer.log"
        auth_file = self.directory / "userlist.txt"
        auth_file.write_text('"postgres" ""\n', encoding="utf-8")
        ini = self.directory / "pgbouncer.ini"
        ini.write_text(
            f"""\
[databases]
* = host={HOST} port={server_port}

[pgbouncer]
listen_addr = {HOST}
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {auth_file}
admin_users = postgres
stats_users = postgres
pool_mode = transaction
default_pool_size = {default_pool_size}
max_client_conn = {max_client_conn}
server_reset_query =
ignore_startup_parameters = extra_float_digits
""",
            encoding="utf-8",
        )
        command = [binary, str(ini)]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "postgres"]
            owner = pwd.getpwnam("postgres")
            for path in (self.directory, auth_file, ini):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._log = self.log_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self._wait_listening()

    def _wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"pgbouncer exited early:\n{self.log}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 1):
                return
            time.sleep(0.05)
        raise AssertionError(f"pgbouncer not listening after {timeout} s:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def url(self, database: str) -> str:
        """The URL of ``database`` through this PgBouncer, as a user would write it."""
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{database}?prepare_threshold=none"

    def url_for(self, direct_url: str) -> str:
        """``direct_url`` (a ``pg_url`` of tests/_services.py) through this PgBouncer."""
        database = direct_url.rsplit("/", 1)[1].split("?", 1)[0]
        return self.url(database)

    def show(self, what: str) -> list[dict[str, str]]:
        """``SHOW <what>`` on the admin console (simple protocol only: through ``psql``)."""
        done = subprocess.run(
            ["psql", "-h", HOST, "-p", str(self.port), "-U", "postgres", "-d", "pgbouncer",
             "-X", "--csv", "-c", f"SHOW {what}"],
            capture_output=True, text=True, timeout=15, check=True,
        )  # fmt: skip
        lines = done.stdout.strip().splitlines()
        if not lines:
            return []
        header = lines[0].split(",")
        return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]

    def close(self) -> None:
        """End the process this object started (SIGINT: PgBouncer's fast shutdown), then
        remove its directory."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@contextlib.contextmanager
def pgbouncer(**options: int) -> Iterator[PgBouncer]:
    """A :class:`PgBouncer`, closed on exit."""
    bouncer = PgBouncer(**options)
    try:
        yield bouncer
    finally:
        bouncer.close()
