"""The Celery transport: the only module in ``orchestrator/`` that touches Celery.

It publishes run messages through the worker package's publisher (one connection, one
producer, pre-encoded JSON), counts the messages the broker still holds for a queue (so the
reconcile loop can tell a backlog from lost messages) and revokes running tasks for
``cancel --terminate``. The store, not Celery, knows what ran: no result backend is used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from orchestrator.errors import BrokerUnavailableError
from orchestrator.runspec import RunSpec
from orchestrator.settings import Settings

__all__ = ["CeleryTransport"]


class CeleryTransport:
    """Publishes runs to the study's queue on ``broker_url``; use as a context manager."""

    def __init__(self, settings: Settings, broker_url: str) -> None:
        self._settings = settings.model_copy(update={"broker_url": broker_url})
        self._app: Any = None

    def __enter__(self) -> CeleryTransport:
        from orchestrator.store import mask_url
        from workers.app import create_app

        self._app = create_app(self._settings)
        try:
            with self._app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:
            self._app.close()
            raise BrokerUnavailableError(
                f"broker {mask_url(str(self._settings.broker_url))} is unreachable "
                f"({type(exc).__name__}). Fix: start Redis or check STUDYQ_BROKER_URL; "
                "nothing was registered or enqueued."
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
