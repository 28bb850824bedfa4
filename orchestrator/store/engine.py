"""Engines, URLs and the one transaction helper of the result store.

Every database access in the store goes through :func:`transaction`: it owns BEGIN, COMMIT,
ROLLBACK and close, and turns driver errors into the store's exceptions, so callers never see
a raw SQLAlchemy error and a transport can tell "retry later" (:class:`StoreUnavailableError`)
from "this is wrong" (:class:`StoreError`).

SQLite is the embedded default. It runs in WAL mode (readers never block the writer), with a
busy timeout instead of instant ``database is locked`` errors, ``synchronous=NORMAL`` (durable
across process crashes, loses at most the last commits on power loss, which a resumable sweep
tolerates) and foreign keys on. The driver's own transaction handling is switched off and the
helper emits ``BEGIN IMMEDIATE`` for writes: a deferred transaction that reads and then writes
can deadlock against another writer, and SQLite reports that as an immediate error that the
busy timeout does not cover.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import StaticPool

from orchestrator.contracts.errors import (
    SettingsError,
    StoreError,
    StoreUnavailableError,
    StoreURLError,
)

__all__ = [
    "DEFAULT_URL",
    "PREPARE_THRESHOLD",
    "AutocommitLane",
    "Execute",
    "create_engine_for",
    "cursor_executor",
    "is_sqlite",
    "json_dumps",
    "mask_url",
    "normalize_url",
    "redact",
    "transaction",
]

DEFAULT_URL = "sqlite:///./studyq.db"
"""The embedded store: a SQLite file in the working directory."""

SQLITE_BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the lock before failing (the embedded coordinator and a
``studyq status`` reader may overlap; transactions are short, so waiting is the right answer)."""

_READONLY_OPTION = "studyq_readonly"


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and pick the driver studyq supports for its backend.

    ``postgresql://`` and ``postgres://`` (what docker, Heroku and most docs hand out) become
    ``postgresql+psycopg://``, because psycopg 3 is the only PostgreSQL driver we depend on.

    Raises:
        StoreURLError: the URL cannot be parsed or names a backend studyq does not support.
    """
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    try:
        parsed = make_url(url)
    except (exc.ArgumentError, ValueError) as error:
        raise StoreURLError(
            f"Cannot parse database URL {mask_url(str(url))!r}: {redact(str(error), url)}. "
            "Use sqlite:///path/to/studyq.db or postgresql://user@host/dbname."
        ) from None
    backend = parsed.get_backend_name()
    driver = parsed.get_driver_name()
    if backend == "postgresql":
        if driver not in ("psycopg", "psycopg2") or "+" not in parsed.drivername:
            parsed = parsed.set(drivername="postgresql+psycopg")
        return parsed
    if backend == "sqlite":
        return parsed
    raise StoreURLError(
        f"Unsupported database backend {backend!r} in {mask_url(parsed)!r}. "
        "studyq stores results in SQLite (sqlite:///file.db) or PostgreSQL (postgresql://...)."
    )


_SECRET_QUERY_KEYS = ("password", "sslpassword", "pass", "passwd")


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``, safe for logs, errors and ``--help``.

    Works on the text, not a parser's idea of it: credentials run to the *last* ``@`` before
    the query (kombu accepts an unescaped ``@`` in a Redis password), and ``password=``-style
    query parameters (which libpq accepts) are masked too. Unparseable input cannot leak.
    """
    text = url.render_as_string(hide_password=False) if isinstance(url, URL) else str(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    base, qmark, query = rest.partition("?")
    if "@" in base:
        credentials, _, host = base.rpartition("@")
        user, colon, _secret = credentials.partition(":")
        base = f"{user}:***@{host}" if colon else f"{credentials}@{host}"
    if qmark:
        parts = []
        for part in query.split("&"):
            key, eq, _value = part.partition("=")
            parts.append(f"{key}=***" if eq and key.lower() in _SECRET_QUERY_KEYS else part)
        query = "&".join(parts)
    return f"{scheme}://{base}{qmark}{query}"


_MIN_FRAGMENT = 3
"""Pieces of a password shorter than this are masked only where they run into an ``@``:
masking every ``a`` of a message would make it unreadable and hides next to nothing."""


def _secrets(url: str | URL) -> list[str]:
    """What of ``url`` must never be printed: its password as written (up to the last
    ``@``, as :func:`mask_url` reads it) and as a parser read it, decoded and encoded,
    ``password=``-style query values, and the pieces a parser splits an unescaped password
    into (``pw@tail`` becomes password ``pw`` and host ``tail@host``), longest first."""
    found: set[str] = set()
    if isinstance(url, URL):
        if url.password:
            found.add(str(url.password))
        text = url.render_as_string(hide_password=False)
    else:
        text = str(url)
    _, sep, rest = text.partition("://")
    if sep:
        base, _, query = rest.partition("?")
        if "@" in base:
            credentials = base.rpartition("@")[0]
            found.add(credentials.partition(":")[2])
        for part in query.split("&"):
            key, eq, value = part.partition("=")
            if eq and key.lower() in _SECRET_QUERY_KEYS:
                found.add(value)
    for secret in list(found):
        found.add(urllib.parse.unquote(secret))
        found.add(urllib.parse.quote(secret, safe=""))
        found.update(re.split(r"[@:/?#&=]", secret))
    return sorted((secret for secret in found if secret), key=len, reverse=True)


def redact(text: str, url: str | URL) -> str:
    """``text`` (a driver's or parser's message about ``url``) with every piece of the URL's
    password replaced by ``***``. Drivers quote what they were given: a host that holds the
    tail of a password with an unescaped ``@`` (``failed to resolve host 'tail@db'``), a
    port that holds a piece of it."""
    for secret in _secrets(url):
        if len(secret) >= _MIN_FRAGMENT:
            text = text.replace(secret, "***")
        else:
            text = re.sub(rf"(?<![\w*]){re.escape(secret)}@", "***@", text)
    return text


def is_sqlite(url_or_engine: str | URL | Engine | Connection) -> bool:
    """Whether the URL, engine or connection is SQLite (the embedded store)."""
    if isinstance(url_or_engine, Engine | Connection):
        return url_or_engine.dialect.name == "sqlite"
    return normalize_url(url_or_engine).get_backend_name() == "sqlite"


def _json_safe(value: Any) -> Any:
    """Make ``value`` storable in PostgreSQL JSONB and identical on both backends.

    JSONB rejects ``NaN``/``Infinity`` and the NUL character, both of which agent outputs and
    metrics do produce; a result that cannot be written would be retried forever. Non-finite
    floats become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` and NUL becomes
    U+FFFD, on SQLite too, so a study reads back the same whichever store recorded it.
    """
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def json_dumps(value: Any) -> str:
    """Serialize for a JSON column (the engine's ``json_serializer``); the common case skips
    the :func:`_json_safe` walk."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:  # NaN or an infinity somewhere
        text = "\\u0000"
    if "\\u0000" in text:  # a NUL somewhere (or the fallback above)
        text = json.dumps(_json_safe(value), ensure_ascii=False, allow_nan=False, default=str)
    return text


def create_engine_for(url: str | URL = DEFAULT_URL, **kwargs: Any) -> Engine:
    """An engine configured for studyq's access pattern on ``url``'s backend.

    Args:
        url: ``sqlite:///file.db``, ``sqlite://`` (in-memory, one shared connection) or
            ``postgresql[+psycopg]://...``; ``?prepare_threshold=none`` for a URL that goes
            through a transaction pooler (:data:`PREPARE_THRESHOLD`).
        **kwargs: passed to :func:`sqlalchemy.create_engine` (e.g. ``pool_size``).

    Raises:
        StoreError: the URL is unsupported.
        SettingsError: the URL is PostgreSQL and its driver is not installed.
    """
    parsed = normalize_url(url)
    options: dict[str, Any] = {"json_serializer": json_dumps}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
            options["poolclass"] = StaticPool
            options["connect_args"] = {"check_same_thread": False}
        options.update(kwargs)
        engine = create_engine(parsed, **options)
        _configure_sqlite(engine)
        return engine
    _require_driver(parsed, url)
    prepare = _prepare_threshold(parsed)
    if parsed.get_driver_name() == "psycopg2":  # never prepares; its DSN has no such key
        parsed = parsed.difference_update_query([PREPARE_THRESHOLD])
    options["pool_pre_ping"] = True
    options["json_deserializer"] = _json_loads
    options.update(kwargs)
    if prepare is not _KEEP:
        options["connect_args"] = {**options.get("connect_args", {}), PREPARE_THRESHOLD: prepare}
    return create_engine(parsed, **options)


PREPARE_THRESHOLD = "prepare_threshold"
"""The URL query parameter (psycopg's own keyword) that says how soon psycopg prepares a
statement on the server; ``?prepare_threshold=none`` never does, which a transaction pooler
without prepared-statement support (PgBouncer before 1.21) needs: the next transaction may
run on another server connection, where the prepared statement does not exist."""

_KEEP = object()
"""No ``prepare_threshold`` in the URL: psycopg's default (prepare after 5 executions)."""


def _prepare_threshold(parsed: URL) -> Any:
    """The value psycopg takes for the URL's ``prepare_threshold`` (``None`` for ``none``, an
    integer), or :data:`_KEEP`. It stays in the URL, so an engine made again from
    ``engine.url`` keeps it; ``connect_args`` replaces the text SQLAlchemy would pass.

    Raises:
        StoreURLError: the value is neither ``none`` nor an integer >= 0.
    """
    if PREPARE_THRESHOLD not in parsed.query or parsed.get_driver_name() != "psycopg":
        return _KEEP
    raw = parsed.query[PREPARE_THRESHOLD]
    text = (raw[-1] if isinstance(raw, tuple) else raw).strip().lower()
    if text in ("none", "null", ""):
        return None
    if text.isdigit():
        return int(text)
    raise StoreURLError(
        f"Invalid {PREPARE_THRESHOLD}={text!r} in database URL {mask_url(parsed)!r}. "
        f"Use ?{PREPARE_THRESHOLD}=none behind a transaction pooler such as PgBouncer, or a "
        "number of executions (psycopg's default is 5)."
    )


_POSTGRES_DRIVERS = {
    "psycopg": "pip install 'studyq[postgres]'",
    "psycopg2": "pip install psycopg2-binary, or drop +psycopg2 from the URL and "
    "pip install 'studyq[postgres]'",
}


def _require_driver(parsed: URL, url: str | URL) -> None:
    """Fail with one line naming the extra when the PostgreSQL driver is not installed, before
    SQLAlchemy's import of it ends in a traceback (the embedded install has no driver: SQLite
    needs none)."""
    driver = parsed.get_driver_name()
    try:
        importlib.import_module(driver)
    except ImportError:
        raise SettingsError(
            f"studyq: {mask_url(url)} needs the PostgreSQL driver {driver!r}, which is not "
            f"installed. Fix: {_POSTGRES_DRIVERS.get(driver, 'pip install ' + driver)}."
        ) from None


_decode_json = json.JSONDecoder().decode


def _json_loads(data: bytes | str) -> Any:
    """psycopg hands JSON columns over as UTF-8 bytes; ``json.loads`` would sniff their
    encoding first, which costs as much as the parse for the small values a run spec holds
    (submit reads four per run)."""
    return _decode_json(data.decode() if isinstance(data, bytes) else data)


def _configure_sqlite(engine: Engine) -> None:
    """Install the WAL pragmas and the explicit BEGIN described in the module docstring."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Autocommit at the driver level: the "begin" hook below emits BEGIN itself.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        readonly = connection.get_execution_options().get(_READONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


@contextmanager
def transaction(engine: Engine, *, readonly: bool = False) -> Iterator[Connection]:
    """One transaction on a pooled connection: commit on success, roll back on any error.

    Args:
        engine: from :func:`create_engine_for`.
        readonly: the block only reads. On SQLite this takes no write lock, so a
            ``studyq status`` never waits behind the embedded coordinator.

    Raises:
        StoreUnavailableError: the database cannot be reached, is locked past the busy
            timeout, or aborted the transaction (deadlock, serialization); retry later.
        StoreError: any other database error, with the masked URL in the message.
    """
    try:
        with engine.connect() as connection:
            if readonly:
                connection.execution_options(**{_READONLY_OPTION: True})
            with connection.begin():
                yield connection
    except exc.DBAPIError as error:
        raise _store_error(engine, error, unavailable=_is_unavailable(engine, error)) from error
    except exc.SQLAlchemyError as error:
        raise _store_error(engine, error, unavailable=False) from error


Execute = Callable[[str, dict[str, Any]], list[Any]]
"""Runs one statement with driver (``%(name)s``) parameters and returns its rows."""


def cursor_executor(cursor: Any) -> Execute:
    """:data:`Execute` on a driver cursor (``AutocommitLane.cursor``)."""

    def execute(sql: str, params: dict[str, Any]) -> list[Any]:
        cursor.execute(sql, params)
        return list(cursor.fetchall())

    return execute


class AutocommitLane:
    """PostgreSQL connections kept checked out, in autocommit, for the single statements a
    worker makes for every run (its claim and its result).

    Each of those is one statement (``orchestrator.store.attempts``), so it needs no
    ``BEGIN``/``COMMIT``; run on the driver's cursor of a connection kept open for it, it
    also skips SQLAlchemy's per-call pool checkout, isolation switch and execution context,
    which cost more CPU than the statement's own round trip (0.25 against 0.07 ms per claim
    here). Connections are taken last-in first-out, so a process with one caller at a time
    keeps one. Errors are reported as :func:`transaction` reports them; a connection that
    failed is discarded, and SQLAlchemy's pool is told so.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    @contextmanager
    def cursor(self, *, transaction: bool = False) -> Iterator[Any]:
        """A driver cursor on a connection in autocommit: each statement commits alone, or,
        with ``transaction``, the block's statements commit together when it ends."""
        with self._lock:
            pooled = self._idle.pop() if self._idle else None
        dbapi = self.engine.dialect.loaded_dbapi
        try:
            if pooled is None:
                pooled = self.engine.raw_connection()
                driver: Any = pooled.driver_connection
                driver.autocommit = True
            connection: Any = pooled.driver_connection
            with connection.cursor() as cursor:
                if transaction:
                    with connection.transaction():
                        yield cursor
                else:
                    yield cursor
        except dbapi.Error as error:
            broken = isinstance(error, dbapi.OperationalError | dbapi.InterfaceError)
            if pooled is not None:
                if broken or pooled.driver_connection.closed:
                    pooled.invalidate()
                else:
                    self._give_back(pooled)
            raise _store_error(self.engine, error, unavailable=broken) from error
        except exc.SQLAlchemyError as error:  # raised while connecting
            unavailable = isinstance(error, exc.DBAPIError) and _is_unavailable(self.engine, error)
            raise _store_error(self.engine, error, unavailable=unavailable) from error
        except StoreError:  # the caller's own check, before the statement was sent
            if pooled is not None:
                self._give_back(pooled)
            raise
        except BaseException:
            if pooled is not None:
                pooled.invalidate()  # interrupted, maybe mid-statement: its state is unknown
            raise
        else:
            self._give_back(pooled)

    def _give_back(self, pooled: Any) -> None:
        with self._lock:
            self._idle.append(pooled)

    def close(self) -> None:
        """Return the kept connections to the engine's pool."""
        with self._lock:
            idle, self._idle = self._idle, []
        for pooled in idle:
            pooled.close()


_SQLITE_TRANSIENT = ("locked", "busy", "unable to open database", "disk i/o error")


def _is_unavailable(engine: Engine, error: exc.DBAPIError) -> bool:
    """Whether retrying later can help: the connection broke, or the server refused, timed
    out or aborted the transaction (PostgreSQL puts all of these, and nothing a caller got
    wrong, under OperationalError). SQLite also reports plain mistakes (a missing table, a
    wrong column count) as OperationalError, so there only lock and I/O trouble counts."""
    if error.connection_invalidated or isinstance(error, exc.InterfaceError):
        return True
    if not isinstance(error, exc.OperationalError):
        return False
    if engine.dialect.name != "sqlite":
        return True
    message = str(error.orig).lower()
    return any(marker in message for marker in _SQLITE_TRANSIENT)


def _store_error(engine: Engine, error: BaseException, *, unavailable: bool) -> StoreError:
    """The store's error for a database error: retryable (:class:`StoreUnavailableError`) or
    not, naming the database and quoting the driver, both with the password masked."""
    detail = redact(_first_line(error), engine.url)
    if unavailable:
        return StoreUnavailableError(
            f"Result store {mask_url(engine.url)} is unavailable: {detail}. "
            "Check that the database is running and reachable, then retry."
        )
    return StoreError(f"Result store {mask_url(engine.url)} failed: {detail}")


def _first_line(error: BaseException) -> str:
    """The driver's message without SQLAlchemy's multi-line SQL and background-link dump."""
    original = getattr(error, "orig", None)
    text = str(original) if original is not None else str(error)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
