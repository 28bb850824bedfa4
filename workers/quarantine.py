"""Poison messages are quarantined, never fatal: the one place studyq reaches into kombu.

Why this module exists: kombu's Redis transport decodes what it pops off a queue before any
hook of kombu's or Celery's is called, and its errors escape into the worker's event loop.
In kombu 5.7, ``Channel._brpop_read`` calls ``loads()`` on the item (not JSON: Celery logs
"Unrecoverable error" and the worker exits), and the consumer callback ``basic_consume``
installs builds a ``Message`` from it (a bad base64 body exits the worker the same way; a
JSON object that is not an envelope raises a ``KeyError`` that makes Celery reconnect, which
restores every unacknowledged message, so runs in flight are delivered twice). Celery's own
hooks (``on_decode_error``, ``on_unknown_task``, ...; see :mod:`workers.consumer`) only see
messages that got that far, and some of Celery's own decoding (the task strategy) raises
outside them too.

So the worker's consumer connects through :class:`QuarantineTransport` (kombu's Redis
transport with :class:`QuarantineChannel`), whose channel checks each popped item with
:func:`workers.poison.inspect_envelope` *before* kombu decodes it. An item that fails is
logged once at ERROR, pushed onto the queue's dead-letter list
(:mod:`orchestrator.contracts.deadletters`) and dropped: BRPOP already took it off the queue, it
never entered kombu's ``unacked`` hash, so nothing else is restored or redelivered because of it.
Broadcasts (remote control, events) are checked as envelopes and dropped when bad.

Only the consuming connection of a worker uses this transport; publishers and the
coordinator use kombu's own. ``_brpop_read`` is kombu 5.7.0's with one line changed (the
``loads`` + ``_deliver``); :data:`KOMBU_SOURCES` pins the source of every kombu method this
relies on, and ``tests/workers/test_quarantine.py`` fails when kombu changes any of them.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import os
import socket
from typing import Any

import amqp
import redis
from kombu.transport import redis as _kombu_redis
from kombu.utils import encoding as _kombu_encoding

from orchestrator.contracts.deadletters import (
    DEAD_LETTER_LIMIT,
    DEAD_LETTER_QUEUE_ARGUMENTS,
    DeadLetter,
    dead_letter_key,
)
from orchestrator.contracts.settings import Settings
from orchestrator.contracts.wire import TASK_NAME
from workers.poison import Poison, check_envelope, inspect_envelope

__all__ = [
    "KOMBU_CHECKED",
    "KOMBU_SOURCES",
    "TRANSPORT",
    "QuarantineChannel",
    "QuarantineTransport",
    "kombu_drift",
    "quarantine",
]

log = logging.getLogger("studyq.worker")

kombu_redis: Any = _kombu_redis  # kombu's hints are partial; used as untyped here
bytes_to_str: Any = _kombu_encoding.bytes_to_str

TRANSPORT = "workers.quarantine:QuarantineTransport"
"""What the worker's consumer passes kombu as ``transport``: a path, not the class, so the
connection's info stays JSON (``celery inspect stats``, Flower)."""

KOMBU_CHECKED = "5.7.0"
"""The kombu version this module was written and checked against."""

KOMBU_SOURCES = {
    "kombu.transport.redis:Channel._brpop_read": "c42518699709f2df",
    "kombu.transport.redis:Channel._deliver_fanout_message": "06662335a70a5b62",
    "kombu.transport.redis:Channel._receive_one": "d59b8751d89757dc",
    "kombu.transport.virtual.base:Channel.basic_consume": "0fec962694938b61",
    "kombu.transport.virtual.base:Message.__init__": "c90d08ccfa2e3e9a",
    "kombu.transport.redis:QoS.append": "35c655f6ecc62fe6",
}
"""sha256 (first 16 hex digits) of the source of each kombu method this module copies or
relies on: the copy of ``_brpop_read``, the fanout hook, and what a message accepted here
goes through next (the callback ``basic_consume`` installs, ``Message``, ``QoS.append``)."""


def _source_digest(qualified: str) -> str:
    module_name, _, path = qualified.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in path.split("."):
        target = getattr(target, part)
    return hashlib.sha256(inspect.getsource(target).encode()).hexdigest()[:16]


def kombu_drift() -> list[str]:
    """The pinned kombu methods whose source is not the one this module was checked with."""
    return [name for name, digest in KOMBU_SOURCES.items() if _source_digest(name) != digest]


def quarantine(
    channel: Any, poison: Poison, *, queue: str, raw: bytes | str, worker: str
) -> DeadLetter:
    """Log ``poison`` once at ERROR and push it onto ``queue``'s dead letters (trimmed to
    :data:`~orchestrator.contracts.deadletters.DEAD_LETTER_LIMIT`) through ``channel``: the
    Redis list, through the channel's connection pool, or on RabbitMQ the dead-letter queue.
    The caller acknowledges or drops the message itself.

    Raises:
        Exception: the broker failed; the message is lost with it (it was poison).
    """
    letter = DeadLetter.new(
        poison.reason, poison.detail, queue=queue, worker=worker, raw=raw, task_id=poison.task_id
    )
    key = dead_letter_key(queue, prefix=getattr(channel, "global_keyprefix", "") or "")
    log.error(
        "quarantined a message on queue %s: %s: %s (task id %s, %d bytes); moved to the "
        "dead-letter list %s, not executed",
        queue,
        poison.reason,
        poison.detail,
        poison.task_id or "unknown",
        letter.size,
        key,
    )
    if hasattr(channel, "pool"):  # kombu's Redis channel
        # A plain client on the channel's pool: kombu's prefixing client prefixes LPUSH but
        # not LTRIM, so the key carries the prefix itself (see dead_letter_key).
        client = redis.Redis(connection_pool=channel.pool)
        with client.pipeline(transaction=True) as pipe:
            pipe.lpush(key, letter.to_json())
            pipe.ltrim(key, 0, DEAD_LETTER_LIMIT - 1)
            pipe.execute()
    else:  # py-amqp's channel (RabbitMQ): a bounded durable queue of that name
        channel.queue_declare(
            queue=key, durable=True, auto_delete=False, arguments=DEAD_LETTER_QUEUE_ARGUMENTS
        )
        channel.basic_publish(
            amqp.Message(
                letter.to_json().encode(), content_type="application/json", delivery_mode=2
            ),
            exchange="",
            routing_key=key,
        )
    return letter


class QuarantineChannel(kombu_redis.Channel):  # type: ignore[misc]  # kombu ships no hints
    """kombu's Redis channel, checking every popped item before kombu decodes it.

    Transport options (set by :class:`workers.consumer.StudyqConsumer`):
    ``studyq_worker`` (who quarantined, for the entry), ``studyq_max_message_bytes`` and
    ``studyq_tasks`` (the task names accepted).
    """

    from_transport_options = (
        *kombu_redis.Channel.from_transport_options,
        "studyq_worker",
        "studyq_max_message_bytes",
        "studyq_tasks",
    )
    studyq_worker: str = ""
    studyq_max_message_bytes: int = Settings.model_fields["max_message_bytes"].default
    studyq_tasks: tuple[str, ...] = (TASK_NAME,)

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.7.0's Channel._brpop_read; only the line marked studyq differs.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # if there's a ConnectionError, disconnect so the next
                # iteration will reconnect automatically.
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(dest)
                self._deliver_checked(item, dest)  # studyq: was _deliver(loads(item), dest)
                return True
            else:
                raise kombu_redis.Empty()
        finally:
            self._in_poll = None
            # The BRPOP connection is now idle (its reply has been fully
            # consumed and no new BRPOP has been issued yet): this is the
            # safe moment to flush any pending streaming re-auth token.
            self._flush_brpop_reauth()

    def _deliver_checked(self, item: bytes, queue: str) -> None:
        """Hand ``item`` to kombu if it is a message this worker accepts, else quarantine."""
        try:
            payload = inspect_envelope(
                item, max_bytes=int(self.studyq_max_message_bytes), tasks=self.studyq_tasks
            )
        except Poison as poison:
            quarantine(self, poison, queue=queue, raw=item, worker=self._worker())
            return
        self.connection._deliver(payload, queue)

    def _deliver_fanout_message(self, message: Any, exchange: str) -> bool:
        """A broadcast (remote control, events) kombu already decoded: bad ones are dropped;
        a broadcast is not a run, and has no queue to dead-letter to."""
        try:
            check_envelope(message)
        except Poison as poison:
            log.error(
                "dropped a broadcast message on exchange %s: %s: %s",
                exchange,
                poison.reason,
                poison.detail,
            )
            return False
        return bool(super()._deliver_fanout_message(message, exchange))

    def _worker(self) -> str:
        return self.studyq_worker or f"{socket.gethostname()}:{os.getpid()}"


class QuarantineTransport(kombu_redis.Transport):  # type: ignore[misc]  # kombu ships no hints
    """kombu's Redis transport with :class:`QuarantineChannel`."""

    Channel = QuarantineChannel
