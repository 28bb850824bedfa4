"""``task-sent`` events of published runs, sent in batches (Flower then lists queued runs)."""

from __future__ import annotations

import os
from typing import Any

from celery.events.event import get_exchange
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset

from orchestrator.contracts.wire import CONTENT_ENCODING, CONTENT_TYPE
from orchestrator.executors.celery.messages import MessageBuilder, RunMessage

__all__ = ["SENT_EVENTS_PER_MESSAGE", "SentEvents"]

SENT_EVENTS_PER_MESSAGE = 100
"""``task-sent`` events per ``task.multi`` event message."""


class SentEvents:
    """``task-sent`` events, as Celery's ``EventDispatcher`` fills them, sent in batches of
    :data:`SENT_EVENTS_PER_MESSAGE` per ``task.multi`` message: the form Celery's own worker
    uses for buffered task events, which Flower and ``celery events`` read like single
    events. One event message per run would cost as much as the run message itself."""

    def __init__(self, app: Any, producer: Any) -> None:
        self.producer = producer
        self.exchange = get_exchange(producer.connection, name=app.conf.event_exchange)
        self.hostname = anon_nodename()
        self.headers = {"hostname": self.hostname}
        self.pid = os.getpid()
        self.clock = app.clock
        self.utcoffset = utcoffset()
        self.declare: list[Any] | None = [self.exchange]
        self.buffer: list[dict[str, Any]] = []

    def add(self, message: RunMessage) -> None:
        self.buffer.append(
            MessageBuilder.sent_event(
                message,
                hostname=self.hostname,
                pid=self.pid,
                clock=self.clock.forward(),
                utcoffset=self.utcoffset,
            )
        )
        if len(self.buffer) >= SENT_EVENTS_PER_MESSAGE:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        self.producer.publish(
            MessageBuilder.encode(self.buffer),
            exchange=self.exchange.name,
            routing_key="task.multi",
            headers=self.headers,
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
            delivery_mode=1,
            declare=self.declare,
        )
        self.declare = None  # declared once per publish call
        self.buffer = []
