"""The worker's consumer: Celery's, with task events sent in batches instead of one by one.

Flower needs three task events per run (``task-received``, ``task-started``,
``task-succeeded``). Celery's worker already buffers them (group ``task``, up to 24 per
``task.multi`` message) but flushes the buffer on the event loop's next tick, so at a few
hundred runs a second nearly every event goes out alone. With kombu 5.7's Redis transport
each flush builds a Redis client and makes one blocking round trip, so events cost the
worker's main process more than the tasks themselves (docs/benchmarks.md: raw Celery with
events drains at about half its rate without them).

:class:`StudyqConsumer` flushes at most every :data:`EVENT_FLUSH_S` instead; a full buffer
(24 events) is still flushed at once by Celery. Flower reads ``task.multi`` messages like
single events, so it shows the same thing, at most a tenth of a second later. Buffered
events are flushed when the consumer stops or reconnects (Celery's ``Events`` step).

Poison messages: the consumer connects through :mod:`workers.quarantine`'s transport, which
moves a message the worker cannot decode or does not recognise to the queue's dead-letter
list before kombu decodes it. Celery's own refusal hooks (``on_decode_error``,
``on_unknown_message``, ``on_unknown_task``, ``on_invalid_task``), which that check leaves
nothing to do for, quarantine the same way instead of Celery's CRITICAL log lines and
tracebacks: one ERROR line, one dead letter, the message acknowledged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, ClassVar
from urllib.parse import urlparse

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

from orchestrator.contracts.deadletters import Reason
from orchestrator.contracts.settings import Settings
from orchestrator.contracts.wire import TASK_NAME
from workers.poison import Poison
from workers.quarantine import TRANSPORT, quarantine
from workers.runtime import worker_name

__all__ = ["EVENT_FLUSH_S", "StudyqConsumer"]

log = logging.getLogger("studyq.worker")

_QUARANTINED_SCHEMES = ("redis", "rediss")
"""Broker schemes whose consuming connection goes through the quarantine transport."""

EVENT_FLUSH_S = 0.1
"""Longest an event waits in the worker's buffer before it is sent."""


class StudyqConsumer(Consumer):  # type: ignore[misc]  # Celery ships no type hints
    """Celery's consumer with a delayed (batched) flush of buffered task events, the
    quarantine of poison messages, and without native delayed delivery."""

    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        """Celery's consumer steps minus ``DelayedDelivery``: on quorum queues it declares
        28 exchanges and queues for ETA/countdown tasks, which studyq never sends."""

        default_steps: ClassVar[list[str]] = [
            step
            for step in Consumer.Blueprint.default_steps
            if not step.endswith(":DelayedDelivery")
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._event_flush_lock = threading.Lock()
        self._event_flush_asked: float | None = None  # monotonic time a flush was scheduled

    def on_send_event_buffered(self) -> None:
        """An event was buffered: make sure one flush is scheduled (never more than one).

        Called from the event loop and, on the threads pool, from pool threads: only the
        lock-protected ``call_soon`` is used here; the timer is set on the loop's thread. A
        flush asked for long ago that never ran (its timer lost in a reconnect) does not
        block the next one.
        """
        hub = self.hub
        if hub is None:  # pragma: no cover - Celery only buffers when there is a hub
            return
        now = time.monotonic()
        with self._event_flush_lock:
            asked = self._event_flush_asked
            if asked is not None and now - asked < 10 * EVENT_FLUSH_S:
                return
            self._event_flush_asked = now
        hub.call_soon(self._schedule_event_flush)

    def _schedule_event_flush(self) -> None:
        self.hub.call_later(EVENT_FLUSH_S, self._flush_buffered_events)

    def _flush_buffered_events(self) -> None:
        with self._event_flush_lock:
            self._event_flush_asked = None
        self._flush_events()

    # -- poison messages ---------------------------------------------------------------------

    def connection_for_read(self, heartbeat: float | None = None) -> Any:
        """The consuming connection, through the quarantine transport on a Redis broker."""
        url = str(self.app.conf.broker_read_url or self.app.conf.broker_url or "")
        if urlparse(url).scheme not in _QUARANTINED_SCHEMES:
            return super().connection_for_read(heartbeat=heartbeat)
        settings = getattr(self.app, "settings", None)
        max_bytes = getattr(settings, "max_message_bytes", None)
        options = {
            "studyq_worker": worker_name(str(self.hostname)),
            "studyq_max_message_bytes": max_bytes or _DEFAULT_MAX_BYTES,
            "studyq_tasks": (TASK_NAME,),
        }
        return self.ensure_connected(
            self.app.connection_for_read(
                heartbeat=heartbeat, transport=TRANSPORT, transport_options=options
            )
        )

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        reason = Reason.CONTENT_TYPE if isinstance(exc, ContentDisallowed) else Reason.BAD_BODY
        self._quarantine(message, reason, f"Celery could not decode it: {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._quarantine(message, Reason.PROTOCOL, "not a Celery task message")

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        name = _header(message, "task")
        self._quarantine(message, Reason.UNKNOWN_TASK, f"task {name!r} is not registered")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        reason = Reason.CONTENT_TYPE if isinstance(exc, ContentDisallowed) else Reason.INVALID_TASK
        self._quarantine(message, reason, f"Celery refused the task message: {exc}")

    def _quarantine(self, message: Any, reason: Reason, detail: str) -> None:
        """Dead-letter ``message`` and acknowledge it (Celery's hooks would reject it, which
        on Redis is the same acknowledgement)."""
        poison = Poison(reason, detail[:500], _header(message, "id"))
        info = getattr(message, "delivery_info", None) or {}
        queue = str(info.get("routing_key") or "unknown")
        raw = getattr(message, "_raw", None)
        try:
            quarantine(
                message.channel,
                poison,
                queue=queue,
                raw=json.dumps(raw, default=str) if raw is not None else str(message.body),
                worker=worker_name(str(self.hostname)),
            )
        except Exception:  # the broker failed: the message is acknowledged all the same
            log.exception("could not write the dead letter of a message on queue %s", queue)
        message.ack_log_error(log, self.connection_errors)


_DEFAULT_MAX_BYTES: int = Settings.model_fields["max_message_bytes"].default


def _header(message: Any, name: str) -> str | None:
    headers = getattr(message, "headers", None)
    value = headers.get(name) if isinstance(headers, dict) else None
    return value if isinstance(value, str) else None
