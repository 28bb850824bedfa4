"""The fault tests' own services and processes, all on 127.0.0.1, all removed afterwards.

* The machine's shared PostgreSQL, Redis (database :data:`REDIS_DB`) and RabbitMQ come from
  tests/_services.py and serve the tests that never restart a service; each test gets a
  database of its own (a copy of a migrated template) and a queue of its own.
* :class:`OwnRedis` and :class:`OwnPostgres` are private servers on free ports, in directories
  made with ``mkdtemp``, for the tests that restart them.
* :class:`Worker` is a real ``celery worker`` subprocess in a process group of its own, so a
  test can SIGKILL or SIGSTOP the whole worker (main process and pool children) by its group.
* :func:`studyq` runs the ``studyq`` CLI as a subprocess (the coordinator).

Every process is started here and signalled only by the id this module recorded. When a
service binary or server is missing the tests are skipped with the reason, unless ``CI`` is
set: then they fail, so CI never goes green by skipping them.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import _services
import redis
from _services import HOST, unavailable

REDIS_DB = _services.REDIS_DBS["faults"]
"""The shared Redis database of the fault tests (the distributed tests use 15); every test
also has a queue of its own and deletes only the keys it created."""
_T = TypeVar("_T")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# Short leases so lost runs come back within seconds (lease >= 4x heartbeat, as required).
FAST_SETTINGS = {
    "STUDYQ_LEASE_S": "4",
    "STUDYQ_HEARTBEAT_S": "1",
    "STUDYQ_QUEUED_TIMEOUT_S": "5",
    "STUDYQ_RECONCILE_INTERVAL_S": "0.5",
    "STUDYQ_SHUTDOWN_GRACE_S": "1",
    "STUDYQ_RESULT_RETRY_S": "120",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_until(
    predicate: Callable[[], _T], timeout: float, what: str, interval: float = 0.05
) -> _T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _die_with_parent() -> None:
    """SIGKILL the child if pytest dies without tearing down (Linux ``PR_SET_PDEATHSIG``;
    SIGKILL, because a worker a test froze with SIGSTOP would never act on SIGTERM)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


# -- the shared servers -------------------------------------------------------------------


def shared_redis() -> redis.Redis:
    """A client on the fault tests' database of the shared Redis, or skip/fail."""
    return _services.redis_client(REDIS_DB)


def shared_broker_url() -> str:
    return _services.redis_url(REDIS_DB)


def pg_url(port: int, database: str, host: str = HOST) -> str:
    return _services.pg_url(database, port=port, host=host)


def pg_execute(port: int, *statements: str) -> None:
    """Statements as the superuser on the server at ``port`` (the shared one, or a test's
    own :class:`OwnPostgres`)."""
    _services.pg_execute(*statements, port=port)


# -- a Redis of the test's own --------------------------------------------------------------


class OwnRedis:
    """``redis-server`` without persistence on a free port; :meth:`restart` loses every key."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed (apt-get install redis-server)")
        self.binary = str(binary)
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="studyq-faults-redis-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        log = (self.dir / f"redis-{self.starts}.log").open("wb")
        self.process = subprocess.Popen(
            [
                self.binary,
                *f"--port {self.port} --bind {HOST} --appendonly no --daemonize no".split(),
                *("--save", ""),
                *("--dir", str(self.dir)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        log.close()
        client = redis.Redis(host=HOST, port=self.port, socket_connect_timeout=1)

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                assert self.process is not None and self.process.poll() is None, "redis died"
                return False

        wait_until(ready, 10, f"redis on port {self.port}")
        client.close()

    def kill(self) -> None:
        """SIGKILL: the server and every message in it are gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def restart(self, down_s: float = 1.0) -> None:
        self.kill()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- a PostgreSQL of the test's own ---------------------------------------------------------


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key)
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path is None:
        unavailable(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")
    return str(on_path)


def _version_key(path: str) -> tuple[int, ...]:
    part = Path(path).parent.parent.name
    return tuple(int(piece) for piece in part.split(".") if piece.isdigit())


class OwnPostgres:
    """A PostgreSQL cluster of the test's own (``initdb`` into a ``mkdtemp`` directory),
    run as the ``postgres`` OS user when the tests run as root, on a free port."""

    def __init__(self, *settings: str) -> None:
        """``settings``: extra ``name=value`` server settings (``-c``)."""
        self.settings = settings
        self.initdb = _pg_bin("initdb")
        self.pg_ctl = _pg_bin("pg_ctl")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="studyq-faults-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as_postgres: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                unavailable("runuser is missing: cannot run PostgreSQL as the postgres user")
            shutil.chown(self.dir, user="postgres", group="postgres")
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        self._run(
            self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
            "-E", "UTF8", "--no-instructions",
        )  # fmt: skip
        self.start()

    def _run(self, *command: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [*self._as_postgres, *command],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}"
                f"\n{result.stderr}\n{self.log_text()}"
            )

    def log_text(self) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return pg_url(self.port, database)

    def start(self) -> None:
        # fsync off only risks data on an OS crash; commits stay synchronous, so a commit
        # the client saw survives the "immediate" stop (a crash of the server) of restart().
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses={HOST} -c fsync=off "
            "-c full_page_writes=off -c max_connections=100"
        )
        options += "".join(f" -c {setting}" for setting in self.settings)
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "30", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def restart(self, down_s: float = 2.0, mode: str = "fast") -> None:
        """Stop (``fast``: every session is terminated, as ``systemctl restart`` does;
        ``immediate``: a crash), stay down ``down_s``, start again."""
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def kill9(self) -> list[int]:
        """SIGKILL the postmaster and every server process at once: a crash in which nothing
        gets to write what it holds in memory (WAL buffers included). Returns the pids."""
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        pids = [pid, *_children(pid)]
        for each in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, signal.SIGKILL)
        wait_until(
            lambda: not any(_running(each) for each in pids), 10, "the killed server processes"
        )
        # A killed process stays a zombie until its parent (here PID 1) reaps it, and the
        # postmaster's lock checks count a zombie as alive: remove the stale lock files, as
        # an operator does once the processes are known dead.
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        (self.dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)
        return pids

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


# -- celery workers -------------------------------------------------------------------------


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(Path(stat).parent.name))
    return sorted(found)


class Worker:
    """A real ``celery -A workers.app worker`` subprocess (prefork, ``-c 2`` by default; or
    ``pool="threads"``) in a process group of its own; its log goes to a file."""

    def __init__(
        self,
        name: str,
        *,
        queue: str,
        database_url: str,
        broker_url: str,
        log_dir: Path,
        concurrency: int = 2,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.nodename = f"{name}@{socket.gethostname()}"
        self.log_path = log_dir / f"{name}.log"
        environment = dict(os.environ)
        environment.update(FAST_SETTINGS)
        environment.update(
            STUDYQ_BROKER_URL=broker_url,
            STUDYQ_DATABASE_URL=database_url,
            PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]),
            PYTHONUNBUFFERED="1",
        )
        environment.update(env or {})
        command = [
            sys.executable, "-m", "celery", "-A", "workers.app", "worker",
            "--without-gossip", "--without-mingle",
            "-Q", queue, "-c", str(concurrency), "-P", pool, "-l", "INFO",
            "-n", self.nodename,
        ]  # fmt: skip
        with self.log_path.open("w", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill or stop it whole
                preexec_fn=_die_with_parent,
            )
        self.pgid = self.process.pid

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited early:\n{self.log[-4000:]}")
            return f"{self.nodename} ready." in self.log

        wait_until(ready, timeout, f"worker {self.name} to be ready", interval=0.1)

    def children(self) -> list[int]:
        return _children(self.pid) if self.alive() else []

    def is_child(self, pid: int) -> bool:
        """Whether ``pid`` is one of this worker's pool children and alive now (one /proc
        read; a killed child the pool has not reaped yet is a zombie, state ``Z``)."""
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        return fields[0] != "Z" and int(fields[1]) == self.pid

    def owns(self, lease_owner: str | None) -> bool:
        return bool(lease_owner) and str(lease_owner).rsplit(":", 1)[0] == self.nodename

    def group_members(self) -> list[int]:
        """Processes still in the worker's group (its session: ``setsid`` made both ids the
        main process's pid, which the kernel never reuses while a member lives)."""
        members = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self.pgid and int(fields[3]) == self.pgid:
                members.append(int(Path(stat).parent.name))
        return members

    def signal_group(self, sig: int) -> None:
        """``sig`` to the worker's process group (main process and pool children), only
        while the group has members, so an id reused later is never signalled."""
        if self.group_members():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, sig)

    def kill(self) -> None:
        """SIGKILL the whole worker; its pool children die with it (same group)."""
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


class Workers:
    """Every worker a test started, stopped in the fixture's finalizer."""

    def __init__(
        self,
        *,
        queue: str,
        database_url: str,
        broker_url: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = dict(env or {})
        self.queue = queue
        self.database_url = database_url
        self.broker_url = broker_url
        self.log_dir = log_dir
        self.started: list[Worker] = []

    def start(self, count: int = 1, *, wait: bool = True, **options: object) -> list[Worker]:
        made = [
            Worker(
                f"w{len(self.started) + i + 1}-{os.getpid()}",
                queue=self.queue,
                database_url=self.database_url,
                broker_url=self.broker_url,
                log_dir=self.log_dir,
                env=self.env,
                **options,  # type: ignore[arg-type]
            )
            for i in range(count)
        ]
        self.started.extend(made)
        if wait:
            for worker in made:
                worker.wait_ready()
        return made

    @property
    def alive(self) -> list[Worker]:
        return [worker for worker in self.started if worker.alive()]

    @property
    def log(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.log}" for w in self.started)

    def tail(self, chars: int = 6000) -> str:
        return "\n".join(f"--- {w.name}\n{w.log[-chars:]}" for w in self.started)

    def stop_all(self, timeout: float = 3.0) -> None:
        """Warm shutdown of every worker at once, then SIGKILL to any group still there
        (a prefork warm shutdown can take 30 s: billiard's pool children wait for the
        parent to read their last results while the parent waits for them to exit)."""
        for worker in self.alive:
            worker.signal_group(signal.SIGCONT)  # a stopped worker cannot shut down
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for worker in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(max(deadline - time.monotonic(), 0.1))
        for worker in self.started:
            worker.kill()  # the group: leftover pool children too


# -- the coordinator CLI --------------------------------------------------------------------


def studyq_env(database_url: str, broker_url: str) -> dict[str, str]:
    environment = dict(os.environ)
    environment.update(FAST_SETTINGS)
    environment.update(
        STUDYQ_BROKER_URL=broker_url,
        STUDYQ_DATABASE_URL=database_url,
        PYTHONPATH=os.pathsep.join([str(HERE), str(REPO)]),
        PYTHONUNBUFFERED="1",
    )
    return environment


def studyq(
    args: Sequence[str], *, database_url: str, broker_url: str, log: Path
) -> subprocess.Popen[bytes]:
    """``studyq ARGS`` as a subprocess (``python -m orchestrator.cli``), output to ``log``."""
    with log.open("wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args],
            cwd=REPO,
            env=studyq_env(database_url, broker_url),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )


@contextlib.contextmanager
def reaped(processes: list[subprocess.Popen[bytes]]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Kill (by pid) any of ``processes`` still running when the block ends."""
    try:
        yield processes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
