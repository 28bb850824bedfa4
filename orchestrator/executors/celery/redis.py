"""Celery on Redis: publish through a pipeline, count a queue's messages, keep dead letters.

kombu's Redis transport keeps a queue as a list named after it, plus one list per priority
step (``<queue>\\x06\\x16<step>``). A delivered message waits in the hash ``unacked`` as
``[message, exchange, routing_key]`` until it is acknowledged, and the sorted set
``unacked_index`` holds its delivery time; a message nobody acknowledged comes back after
the visibility timeout. This module reads those structures through the channel's public
attributes (``priority_steps``, ``sep``, ``unacked_key``, ``unacked_index_key``,
``global_keyprefix``, ``pool``, ``client``), never kombu's private methods.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from redis import Redis

from orchestrator.contracts.deadletters import DeadLetter, dead_letter_key
from orchestrator.executors.celery.driver import BrokerDriver, SizeCheck
from orchestrator.executors.celery.events import SentEvents
from orchestrator.executors.celery.messages import DeliveryTags, MessageBuilder
from orchestrator.executors.transport import Publication

__all__ = ["PUBLISH_BATCH", "RedisBroker"]

log = logging.getLogger("studyq.coordinator")

PUBLISH_BATCH = 500
"""Messages per ``LPUSH`` (one round trip) when publishing."""


class RedisBroker(BrokerDriver):
    """The Redis half of :class:`~orchestrator.executors.celery.CeleryTransport`."""

    def publish(
        self,
        builder: MessageBuilder,
        items: Iterable[Publication],
        *,
        events: bool,
        check_size: SizeCheck,
    ) -> int:
        """LPUSH the runs' envelopes (kombu's, pre-encoded: see
        :meth:`MessageBuilder.envelope`), :data:`PUBLISH_BATCH` per command: one ``LPUSH``
        of many values leaves the list as the same ``LPUSH`` one by one would, for one
        command's packing and round trip instead of hundreds."""
        hard_limit = builder.time_limit[0]
        if hard_limit is not None and hard_limit >= self.settings.visibility_timeout_s:
            log.warning(
                "runs may take up to %.0f s but the broker redelivers unacknowledged messages "
                "after %.0f s (STUDYQ_VISIBILITY_TIMEOUT_S); long runs will get duplicate "
                "deliveries, which workers acknowledge without executing",
                hard_limit,
                self.settings.visibility_timeout_s,
            )
        limit = self.settings.max_message_bytes
        published = 0
        tags = DeliveryTags()
        with self.app.producer_or_acquire() as producer:
            sent = SentEvents(self.app, producer) if events else None
            with producer.channel.conn_or_acquire() as client:
                waiting: list[str] = []
                for spec, attempt, label in items:
                    message = builder.build(spec, attempt, label)
                    envelope = builder.envelope(message, tags())
                    if len(envelope) * 4 > limit:  # utf-8 is at most 4 bytes a character
                        check_size(envelope, spec)
                    waiting.append(envelope)
                    if sent is not None:
                        sent.add(message)
                    if len(waiting) >= PUBLISH_BATCH:
                        client.lpush(builder.queue, *waiting)
                        published += len(waiting)
                        waiting = []
                if waiting:
                    client.lpush(builder.queue, *waiting)
                    published += len(waiting)
            if sent is not None:
                sent.flush()
        return published

    def backlog(self, queue: str, *, delivered_within_s: float | None) -> int:
        """Waiting in ``queue``'s lists, plus delivered (within ``delivered_within_s``) and
        not acknowledged. Runs are published to the default exchange with the queue as
        routing key, so the unacknowledged entries of ``queue`` are those with that routing
        key. The hash is shared by every queue of the broker database but small: one entry
        per busy worker slot, plus the deliveries of workers that died or froze holding
        them, which stay until the visibility timeout.

        The waiting messages are counted first: a worker pops a message from the list and
        records it as unacknowledged in two steps, so a message moving in between is counted
        twice rather than missed (except while it is between the two steps).
        """
        since = "-inf" if delivered_within_s is None else time.time() - delivered_within_s
        with self.app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
            channel = connection.default_channel
            client = channel.client  # prefixes keys with kombu's global_keyprefix
            lists = [queue if not step else f"{queue}{channel.sep}{step}"
                     for step in channel.priority_steps]  # fmt: skip
            with client.pipeline(transaction=False) as pipe:
                for name in lists:
                    pipe.llen(name)
                waiting = sum(int(count) for count in pipe.execute())
            tags = client.zrange(channel.unacked_index_key, since, "+inf", byscore=True)
            with client.pipeline(transaction=False) as pipe:
                for tag in tags:
                    pipe.hget(channel.unacked_key, tag)
                entries = pipe.execute() if tags else []
        unacked = sum(_routing_key(entry) == queue for entry in entries if entry is not None)
        return waiting + unacked

    def dead_letters(self, queue: str, *, limit: int | None) -> list[DeadLetter]:
        stop = -1 if limit is None else max(limit, 1) - 1
        with self._dead_letter_list(queue) as (client, key):
            entries = client.lrange(key, 0, stop)
        return [DeadLetter.from_json(entry) for entry in entries]

    def dead_letter_count(self, queue: str) -> int:
        with self._dead_letter_list(queue) as (client, key):
            return int(client.llen(key))

    def purge_dead_letters(self, queue: str) -> int:
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
        with self.app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
            channel = connection.default_channel
            key = dead_letter_key(queue, prefix=channel.global_keyprefix or "")
            yield Redis(connection_pool=channel.pool), key


def authentication_failure(exc: BaseException) -> str | None:
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


def _routing_key(raw: bytes | str) -> str | None:
    """The routing key of one entry of kombu's ``unacked`` hash, or None if unreadable."""
    try:
        entry = json.loads(raw)
        return str(entry[2])
    except (ValueError, TypeError, IndexError, KeyError):
        return None
