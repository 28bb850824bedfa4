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
"""

from __future__ import annotations

import threading
import time
from typing import Any

from celery.worker.consumer import Consumer

__all__ = ["EVENT_FLUSH_S", "StudyqConsumer"]

EVENT_FLUSH_S = 0.1
"""Longest an event waits in the worker's buffer before it is sent."""


class StudyqConsumer(Consumer):  # type: ignore[misc]  # Celery ships no type hints
    """Celery's consumer with a delayed (batched) flush of buffered task events."""

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
