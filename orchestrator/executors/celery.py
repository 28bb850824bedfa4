"""The Celery transport: the only module in ``orchestrator/`` that touches Celery.

It publishes run messages through the worker package's publisher (one connection, one
producer, pre-encoded JSON), counts the messages the broker still holds for a queue (so the
reconcile loop can tell a backlog from lost messages), revokes running tasks for
``cancel --terminate``, and reads and purges the dead-letter lists workers move poison
messages to (``studyq dead-letters``; key and format in :mod:`orchestrator.contracts.deadletters`).
The store, not Celery, knows what ran: no result backend is used.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any

from orchestrator.contracts.deadletters import DeadLetter, dead_letter_key
from orchestrator.contracts.errors import BrokerUnavailableError, SettingsError, StudyqError
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings

__all__ = ["CeleryTransport", "check_broker"]


def check_broker(broker_url: str, *, timeout_s: float = 3.0) -> None:
    """Connect to the broker once (``studyq check``).

    Raises:
        SettingsError: the broker refused the URL's credentials (a wrong or missing
            password): retrying cannot help.
        BrokerUnavailableError: the broker cannot be reached.
    """
    from kombu import Connection  # type: ignore[attr-defined]

    try:
        with Connection(broker_url, connect_timeout=timeout_s) as connection:  # type: ignore[no-untyped-call]
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        raise _connect_error(broker_url, exc, consequence="") from None


def _connect_error(broker_url: str, exc: BaseException, *, consequence: str) -> StudyqError:
    """What a failed connection to ``broker_url`` means for the user: a password the broker
    refused (:class:`SettingsError`) or a broker that is not there
    (:class:`BrokerUnavailableError`); the URL is masked."""
    from orchestrator.store import mask_url

    where = f"broker {mask_url(broker_url)}"
    refused = _authentication_failure(exc)
    if refused is not None:
        return SettingsError(
            f"{where}: authentication failed ({refused}). Fix: check the password in "
            f"STUDYQ_BROKER_URL (or --broker), as in redis://:PASSWORD@HOST:6379/0"
            f"{consequence}."
        )
    return BrokerUnavailableError(
        f"{where} is unreachable ({type(exc).__name__}). Fix: start Redis or check "
        f"STUDYQ_BROKER_URL{consequence}."
    )


def _authentication_failure(exc: BaseException) -> str | None:
    """Redis' reason when ``exc`` (or what it wraps: kombu re-raises redis-py's errors as
    its own) is a refused login, else None."""
    from redis.exceptions import AuthenticationError, ResponseError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        if isinstance(current, AuthenticationError) or (
            isinstance(current, ResponseError) and text.startswith(("NOAUTH", "WRONGPASS"))
        ):
            return text.rstrip(".") or type(current).__name__
        current = current.__cause__ or current.__context__
    return None


class CeleryTransport:
    """Publishes runs to the study's queue on ``broker_url``; use as a context manager."""

    def __init__(self, settings: Settings, broker_url: str) -> None:
        self._settings = settings.model_copy(update={"broker_url": broker_url})
        self._app: Any = None

    def __enter__(self) -> CeleryTransport:
        from workers.app import create_app

        self._app = create_app(self._settings)
        try:
            with self._app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:
            self._app.close()
            raise _connect_error(
                str(self._settings.broker_url),
                exc,
                consequence="; nothing was registered or enqueued",
            ) from None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._app is not None:
            self._app.close()
            self._app = None

    def publish(
        self,
        items: Iterable[tuple[RunSpec, int, str]],
        *,
        queue: str,
        timeout_s: float | None,
    ) -> int:
        """Publish ``(spec, attempt, condition label)`` items; returns how many."""
        from workers.tasks import publish_runs

        return int(publish_runs(self._app, items, queue=queue, time_limit_s=timeout_s))

    def queue_backlog(self, queue: str, *, delivered_within_s: float | None = None) -> int:
        """How many messages the broker holds for ``queue``: waiting in it, plus delivered to
        a worker and not acknowledged yet (a run being executed, or a message a worker
        reserved and has not claimed yet) — with ``delivered_within_s``, only the deliveries
        made in the last that many seconds.

        kombu's Redis transport keeps a queue as a list named after it plus one list per
        priority step. A delivered message waits in the hash ``unacked`` as ``[message,
        exchange, routing_key]`` until it is acknowledged, and the sorted set
        ``unacked_index`` holds its delivery time. Runs are published to the default
        exchange with the queue as routing key, so the unacknowledged entries of ``queue``
        are those with that routing key. The hash is shared by every queue of the broker
        database but small: one entry per busy worker slot, plus the deliveries of workers
        that died or froze holding them, which stay until the visibility timeout.

        The waiting messages are counted first: a worker pops a message from the list and
        records it as unacknowledged in two steps, so a message moving in between is counted
        twice rather than missed (except while it is between the two steps).

        Raises:
            BrokerUnavailableError: the count cannot be read (the broker is unreachable, or
                the transport does not keep its messages as described).
        """
        from orchestrator.store import mask_url

        since = "-inf" if delivered_within_s is None else time.time() - delivered_within_s
        try:
            with self._app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
                channel = connection.default_channel
                waiting = int(channel._size(queue))  # the list and its priority sub-lists
                client = channel.client  # prefixes keys with kombu's global_keyprefix
                tags = client.zrange(channel.unacked_index_key, since, "+inf", byscore=True)
                with client.pipeline(transaction=False) as pipe:
                    for tag in tags:
                        pipe.hget(channel.unacked_key, tag)
                    entries = pipe.execute() if tags else []
        except Exception as exc:  # kombu and redis-py raise many types; all mean "unknown"
            raise BrokerUnavailableError(
                f"cannot count the messages for queue '{queue}' on broker "
                f"{mask_url(str(self._settings.broker_url))} ({_describe(exc)})"
            ) from exc
        unacked = sum(_routing_key(entry) == queue for entry in entries if entry is not None)
        return waiting + unacked

    def revoke(self, running: Sequence[tuple[RunSpec, int]]) -> None:
        """Terminate the tasks executing these runs (``attempt`` as stored when claimed)."""
        from workers.messages import task_id_for

        task_ids = [task_id_for(spec, max(attempt - 1, 0)) for spec, attempt in running]
        if task_ids:
            self._app.control.revoke(task_ids, terminate=True, signal="SIGTERM")

    # -- dead letters (orchestrator.contracts.deadletters) ---------------------------------

    def dead_letters(self, queue: str, *, limit: int | None = None) -> list[DeadLetter]:
        """The messages workers quarantined from ``queue``, newest first (at most ``limit``).

        Raises:
            BrokerUnavailableError: the list cannot be read.
        """
        stop = -1 if limit is None else max(limit, 1) - 1
        with self._dead_letter_list(queue) as (client, key):
            entries = client.lrange(key, 0, stop)
        return [DeadLetter.from_json(entry) for entry in entries]

    def dead_letter_count(self, queue: str) -> int:
        """How many messages workers quarantined from ``queue`` (kept: at most
        ``DEAD_LETTER_LIMIT``).

        Raises:
            BrokerUnavailableError: the list cannot be read.
        """
        with self._dead_letter_list(queue) as (client, key):
            return int(client.llen(key))

    def purge_dead_letters(self, queue: str) -> int:
        """Delete ``queue``'s dead letters; returns how many there were.

        Raises:
            BrokerUnavailableError: the list cannot be changed.
        """
        with (
            self._dead_letter_list(queue) as (client, key),
            client.pipeline(transaction=True) as pipe,
        ):
            pipe.llen(key)
            pipe.delete(key)
            count, _ = pipe.execute()
        return int(count)

    @contextlib.contextmanager
    def _dead_letter_list(self, queue: str) -> Iterator[tuple[Any, str]]:
        """A plain Redis client on the broker and the full key of ``queue``'s dead letters
        (kombu's ``global_keyprefix`` included: see ``dead_letter_key``)."""
        from redis import Redis

        from orchestrator.store import mask_url

        try:
            with self._app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
                channel = connection.default_channel
                key = dead_letter_key(queue, prefix=channel.global_keyprefix or "")
                yield Redis(connection_pool=channel.pool), key
        except Exception as exc:  # kombu and redis-py raise many types; all mean "unreadable"
            raise BrokerUnavailableError(
                f"cannot read the dead letters of queue '{queue}' on broker "
                f"{mask_url(str(self._settings.broker_url))} ({_describe(exc)})"
            ) from exc


def _routing_key(raw: bytes | str) -> str | None:
    """The routing key of one entry of kombu's ``unacked`` hash, or None if unreadable."""
    try:
        entry = json.loads(raw)
        return str(entry[2])
    except (ValueError, TypeError, IndexError, KeyError):
        return None


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message``, short enough for one progress line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
