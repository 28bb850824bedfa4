"""The real services of the tests, supplied from one place (optuna's ``StorageSupplier``).

Everything is on 127.0.0.1 and everything a test session creates is removed at its end:

* PostgreSQL (5432): :func:`pg_database` / :func:`create_pg_database` give a fresh database
  ``studyq_test_<pid>_<tag>``, dropped afterwards; :func:`drop_stale_pg_databases` drops the
  ones a killed session (its pid no longer runs) left behind.
* Redis (6379): each suite has a database number of its own (:data:`REDIS_DBS`), flushed when
  the session first uses it and when it ends, unless another live test session on this
  machine uses it too (:func:`redis_database`).
* RabbitMQ (5672, guest/guest): one vhost ``studyq_test_<pid>`` per session, made with
  ``rabbitmqctl add_vhost`` + ``set_permissions`` on first use and deleted at the end
  (``rabbitmqctl`` takes about a second a call, so never per test).
* :class:`ServiceSupplier` holds the session's share of all three (the ``services`` fixture
  of tests/conftest.py); ``services.broker(kind, redis_db=...)`` is a :class:`Broker` of
  either transport of :data:`TRANSPORTS`, ``services.broker_url(kind, ...)`` its URL.

A service that cannot be reached skips the tests that need it, with the reason, unless
``CI`` is set: then they fail, so CI never goes green by skipping them (dramatiq's conftest).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, NoReturn

import pytest
import redis
from sqlalchemy import Engine, create_engine, exc, text

HOST = "127.0.0.1"
PG_PORT = int(os.environ.get("STUDYQ_TEST_PG_PORT", "5432"))
REDIS_PORT = int(os.environ.get("STUDYQ_TEST_REDIS_PORT", "6379"))
RABBITMQ_PORT = int(os.environ.get("STUDYQ_TEST_RABBITMQ_PORT", "5672"))
RABBITMQ_USER = "guest"
RABBITMQ_PASSWORD = "guest"

REDIS_DBS = {"distributed": 15, "faults": 14, "bench": 12}
"""The Redis database of each user of the shared server, so suites never see each other's
keys (bench/distributed.py's ``--redis-db`` defaults to 12; tests/deploy uses 15 too, for
queues of its own)."""

Transport = Literal["redis", "rabbitmq"]
TRANSPORTS: tuple[Transport, ...] = ("redis", "rabbitmq")

_PREFIX = "studyq_test_"
_OURS = re.compile(rf"{_PREFIX}(\d+)(?:_\w+)?")
"""Names of what a test session creates: databases and vhosts ``studyq_test_<pid>[_tag]``."""


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail when ``CI`` is set."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so these tests must run)")
    pytest.skip(reason)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(name: str) -> bool:
    """Whether ``name`` is something a test session made that has since died."""
    match = _OURS.fullmatch(name)
    return bool(match) and not _pid_alive(int(match.group(1)))


# -- PostgreSQL ----------------------------------------------------------------------------


def pg_url(database: str, *, port: int = PG_PORT, host: str = HOST) -> str:
    return f"postgresql+psycopg://postgres@{host}:{port}/{database}"


def pg_name(tag: str) -> str:
    """The name of this session's database ``tag`` (letters, digits, ``_``)."""
    return f"{_PREFIX}{os.getpid()}_{tag}"


def pg_admin(port: int = PG_PORT) -> Engine:
    """The server's ``postgres`` database as the superuser, autocommit."""
    return create_engine(
        pg_url("postgres", port=port),
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": 3},
    )


def pg_execute(*statements: str, port: int = PG_PORT) -> None:
    engine = pg_admin(port)
    try:
        with engine.connect() as connection:
            for statement in statements:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def _unreachable_pg(error: Exception, port: int) -> NoReturn:
    unavailable(f"PostgreSQL at {HOST}:{port} is not usable: {error}".splitlines()[0])


def require_postgres(port: int = PG_PORT) -> None:
    """Skip (or fail in CI) when the server cannot be reached."""
    try:
        pg_execute("SELECT 1", port=port)
    except exc.OperationalError as error:
        _unreachable_pg(error, port)


def create_pg_database(name: str, *, template: str | None = None, port: int = PG_PORT) -> str:
    """An empty database ``name`` (or a copy of ``template``), dropped first if a crashed run
    left it; returns its URL."""
    copy = f' TEMPLATE "{template}"' if template else ""
    try:
        pg_execute(
            f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
            f'CREATE DATABASE "{name}"{copy}',
            port=port,
        )
    except exc.OperationalError as error:
        _unreachable_pg(error, port)
    return pg_url(name, port=port)


def drop_pg_database(name: str, *, port: int = PG_PORT) -> None:
    pg_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', port=port)


def drop_stale_pg_databases(port: int = PG_PORT) -> None:
    """Drop the databases of test sessions that were killed before their teardown."""
    engine = pg_admin(port)
    try:
        with engine.connect() as connection:
            names = connection.execute(
                text("SELECT datname FROM pg_database WHERE datname LIKE 'studyq\\_test\\_%'")
            ).scalars()
            for name in [name for name in names if _stale(name)]:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    except exc.OperationalError as error:
        _unreachable_pg(error, port)
    finally:
        engine.dispose()


@contextlib.contextmanager
def pg_database(tag: str, *, template: str | None = None, migrate: bool = False) -> Iterator[str]:
    """A fresh database :func:`pg_name` ``(tag)`` on the shared server, migrated to the head
    revision when ``migrate``; dropped on exit."""
    name = pg_name(tag)
    url = create_pg_database(name, template=template)
    try:
        if migrate:
            from orchestrator.store import upgrade

            upgrade(url)
        yield url
    finally:
        drop_pg_database(name)


# -- Redis ---------------------------------------------------------------------------------


def redis_url(db: int, *, port: int = REDIS_PORT) -> str:
    return f"redis://{HOST}:{port}/{db}"


def redis_client(db: int, *, port: int = REDIS_PORT) -> redis.Redis:
    """A client on database ``db`` of the shared server, or skip/fail when it is down."""
    client = redis.Redis(host=HOST, port=port, db=db, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as error:
        client.close()
        unavailable(f"Redis at {HOST}:{port} is not usable: {error}")
    return client


_SESSION_KEY = "_studyq_test_session:"
"""Each live test session using a database keeps ``<this><pid>`` in it."""


def _flush_unless_shared(client: redis.Redis) -> None:
    """FLUSHDB, unless another live test session on this machine uses the database (the
    engineers of the team run suites side by side on one server)."""
    others = [
        int(key.decode().rsplit(":", 1)[1])
        for key in client.scan_iter(match=f"{_SESSION_KEY}*")
        if key.decode().rsplit(":", 1)[1].isdigit()
    ]
    if not any(pid != os.getpid() and _pid_alive(pid) for pid in others):
        client.flushdb()


@contextlib.contextmanager
def redis_database(db: int) -> Iterator[redis.Redis]:
    """Database ``db`` of the shared Redis, flushed now and on exit (see
    :func:`_flush_unless_shared`); a client on it."""
    client = redis_client(db)
    marker = f"{_SESSION_KEY}{os.getpid()}"
    try:
        _flush_unless_shared(client)
        client.set(marker, "1")
        yield client
    finally:
        with contextlib.suppress(redis.RedisError):
            client.delete(marker)
            _flush_unless_shared(client)
        client.close()


def forget_redis_queue(client: redis.Redis, queue: str) -> None:
    """Delete ``queue``'s keys (the list, its priority lists and kombu's bindings) and its
    messages' entries in kombu's unacknowledged hash."""
    for key in list(client.scan_iter(match=f"*{queue}*")):
        client.delete(key)
    for tag, raw in list(client.hscan_iter("unacked")):
        with contextlib.suppress(ValueError, IndexError, TypeError):
            if json.loads(raw)[2] == queue:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)


def _redis_backlog(client: redis.Redis, queue: str) -> tuple[int, int]:
    waiting = sum(int(client.llen(key)) for key in client.scan_iter(match=f"{queue}*"))
    unacked = 0
    for _, raw in client.hscan_iter("unacked"):
        with contextlib.suppress(ValueError, IndexError, TypeError):
            unacked += json.loads(raw)[2] == queue
    return waiting, unacked


# -- RabbitMQ ------------------------------------------------------------------------------


def amqp_url(vhost: str, *, port: int = RABBITMQ_PORT) -> str:
    return f"amqp://{RABBITMQ_USER}:{RABBITMQ_PASSWORD}@{HOST}:{port}/{vhost}"


def require_rabbitmq(port: int = RABBITMQ_PORT) -> None:
    """Skip (or fail in CI) when nothing listens on the AMQP port or ``rabbitmqctl`` is
    missing (the vhosts are made with it)."""
    try:
        socket.create_connection((HOST, port), timeout=3).close()
    except OSError as error:
        unavailable(f"RabbitMQ at {HOST}:{port} is not usable: {error}")
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not installed (apt-get install rabbitmq-server)")


def rabbitmqctl(*args: str, timeout: float = 60.0) -> str:
    """Run ``rabbitmqctl ARGS`` (as root, as the machine's services are); its output."""
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def _vhosts() -> list[str]:
    return rabbitmqctl("list_vhosts", "--quiet", "--no-table-headers").split()


@contextlib.contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """The session's vhost ``studyq_test_<pid>``, with every right for ``guest``; the vhosts
    of killed sessions are deleted first, this one on exit (its queues go with it)."""
    require_rabbitmq()
    name = f"{_PREFIX}{os.getpid()}"
    for stale in [vhost for vhost in _vhosts() if _stale(vhost) or vhost == name]:
        rabbitmqctl("delete_vhost", stale)
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, RABBITMQ_USER, ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def _rabbitmq_backlog(vhost: str, queue: str) -> tuple[int, int]:
    listing = rabbitmqctl(
        "list_queues", "-p", vhost, "name", "messages_ready", "messages_unacknowledged",
        "--quiet", "--no-table-headers",
    )  # fmt: skip
    for line in listing.splitlines():
        name, ready, unacked = line.split()
        if name == queue:
            return int(ready), int(unacked)
    return 0, 0


# -- both transports -----------------------------------------------------------------------


@dataclass(frozen=True)
class Broker:
    """A broker of one transport, as the tests' workers and coordinators are given it: the
    shared Redis or RabbitMQ (:meth:`ServiceSupplier.broker`), or a test's own Redis."""

    kind: Transport
    url: str
    masked_url: str
    """``url`` as studyq prints it (a password as ``***``)."""
    vhost: str | None = None

    @classmethod
    def redis(cls, url: str) -> Broker:
        return cls("redis", url, re.sub(r":[^:@/]*@", ":***@", url))

    def _redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=3)

    def backlog(self, queue: str) -> tuple[int, int]:
        """``(messages waiting in queue, delivered to a worker and not acknowledged)``: on
        RabbitMQ as ``rabbitmqctl list_queues`` last saw them (poll it until it agrees)."""
        if self.kind == "rabbitmq":
            assert self.vhost is not None
            return _rabbitmq_backlog(self.vhost, queue)
        with contextlib.closing(self._redis_client()) as client:
            return _redis_backlog(client, queue)

    def waiting(self, queue: str) -> int:
        """How many messages wait in ``queue`` (delivered ones not counted). On RabbitMQ the
        queue's own count (a passive declare): ``list_queues`` shows a quorum queue's
        figures as of its last metrics tick, seconds old."""
        if self.kind == "rabbitmq":
            from amqp.exceptions import NotFound
            from kombu import Connection

            with Connection(self.url, connect_timeout=3) as connection:
                try:
                    ok = connection.default_channel.queue_declare(queue, passive=True)
                except NotFound:
                    return 0
                return int(ok.message_count)
        return self.backlog(queue)[0]

    def forget(self, queue: str) -> None:
        """Remove ``queue`` and whatever the broker keeps for its messages; quietly, since
        it runs in teardown (a RabbitMQ queue also goes with the session's vhost)."""
        if self.kind == "rabbitmq":
            from kombu import Connection

            with contextlib.suppress(Exception), Connection(self.url, connect_timeout=3) as conn:
                conn.default_channel.queue_delete(queue)
            return
        with contextlib.suppress(redis.RedisError), contextlib.closing(self._redis_client()) as c:
            forget_redis_queue(c, queue)


@dataclass
class ServiceSupplier:
    """The services of one test session, each made on first use and removed by
    :meth:`close`: the Redis databases it flushed and the RabbitMQ vhost."""

    _redis: dict[int, redis.Redis] = field(default_factory=dict)
    _vhost: str | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _swept_pg: bool = False

    def pg_database(
        self, tag: str, *, template: str | None = None, migrate: bool = False
    ) -> contextlib.AbstractContextManager[str]:
        """:func:`pg_database`, after dropping what killed sessions left (once)."""
        if not self._swept_pg:
            drop_stale_pg_databases()
            self._swept_pg = True
        return pg_database(tag, template=template, migrate=migrate)

    def redis(self, db: int) -> redis.Redis:
        """A client on database ``db``, flushed the first time the session asks for it."""
        if db not in self._redis:
            self._redis[db] = self._stack.enter_context(redis_database(db))
        return self._redis[db]

    def vhost(self) -> str:
        """The session's RabbitMQ vhost."""
        if self._vhost is None:
            self._vhost = self._stack.enter_context(rabbitmq_vhost())
        return self._vhost

    def broker(self, kind: Transport, *, redis_db: int) -> Broker:
        """The broker of transport ``kind``: database ``redis_db`` of the shared Redis, or the
        session's RabbitMQ vhost."""
        if kind == "redis":
            self.redis(redis_db)
            return Broker.redis(redis_url(redis_db))
        if kind == "rabbitmq":
            vhost = self.vhost()
            masked = amqp_url(vhost).replace(f":{RABBITMQ_PASSWORD}@", ":***@")
            return Broker(kind, amqp_url(vhost), masked, vhost=vhost)
        raise ValueError(f"unknown transport {kind!r}; expected one of {TRANSPORTS}")

    def broker_url(self, kind: Transport, *, redis_db: int) -> str:
        return self.broker(kind, redis_db=redis_db).url

    def close(self) -> None:
        self._stack.close()
        self._redis.clear()
        self._vhost = None
