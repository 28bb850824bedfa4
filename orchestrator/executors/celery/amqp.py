"""Celery on RabbitMQ: publish with confirms, count a queue's messages, keep dead letters.

Run queues are quorum queues (:data:`orchestrator.contracts.broker.QUEUE_TYPE`), declared
here before the first publish exactly as the workers' Celery declares them (RabbitMQ drops a
message routed to no queue). Publishing uses publisher confirms, pipelined: the messages of
a page are sent, then the broker's acknowledgements are awaited, so a published run is on a
majority of the queue's replicas, on disk, when ``publish`` returns; a refused (nacked)
message fails the call.

The backlog comes from a passive ``queue.declare``: its ``message_count`` (the messages
ready for delivery) and ``consumer_count``. AMQP has no management-free way to read the
unacknowledged messages; those of runs executing do not matter (their runs are not queued),
but a message just delivered whose run is not claimed yet does, for a moment: while the
queue still holds messages, one such delivery per consumer is counted as held, so a run on
its way to a worker is not taken for lost. Once the queue is empty, nothing is added: a
queued run without a message is then published again after ``queued_timeout_s`` (at worst
a duplicate, which its claim refuses).

Dead letters are the classic durable queue ``studyq.dead.<queue>``, bounded by
``x-max-length`` with ``drop-head`` (the oldest go first, as the Redis list is trimmed).
Listing reads them with ``basic.get`` without acknowledging and closes the channel, which
returns them to the queue.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from amqp import Message

from orchestrator.contracts.deadletters import (
    DEAD_LETTER_LIMIT,
    DeadLetter,
    dead_letter_key,
)
from orchestrator.contracts.errors import BrokerUnavailableError
from orchestrator.contracts.wire import CONTENT_ENCODING, CONTENT_TYPE
from orchestrator.executors.celery.driver import BrokerDriver, SizeCheck
from orchestrator.executors.celery.events import SentEvents
from orchestrator.executors.celery.messages import MessageBuilder
from orchestrator.executors.transport import Publication

__all__ = ["CONFIRM_WINDOW", "RabbitBroker"]

CONFIRM_WINDOW = 1000
"""Messages published before waiting for the broker to confirm them."""

_CONFIRM_TIMEOUT_S = 30.0


class _Confirms:
    """Counts the broker's confirms of one channel's publishes (delivery tags 1, 2, ...)."""

    def __init__(self, channel: Any) -> None:
        self.sent = 0
        self.upto = 0  # every tag <= upto is confirmed
        self.singles: set[int] = set()
        self.nacked = 0
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)

    def _ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self.upto = max(self.upto, delivery_tag)
        else:
            self.singles.add(delivery_tag)
        while self.upto + 1 in self.singles:
            self.upto += 1
            self.singles.discard(self.upto)
        self.singles = (
            {tag for tag in self.singles if tag > self.upto} if multiple else self.singles
        )

    def _nack(self, delivery_tag: int, multiple: bool) -> None:
        self.nacked += 1
        self._ack(delivery_tag, multiple)

    def wait(self, connection: Any) -> None:
        """Until every message sent so far is confirmed.

        Raises:
            BrokerUnavailableError: the broker refused one, or did not answer in time.
        """
        while self.upto < self.sent:
            try:
                connection.drain_events(timeout=_CONFIRM_TIMEOUT_S)
            except TimeoutError:
                raise BrokerUnavailableError(
                    f"RabbitMQ confirmed {self.upto} of {self.sent} run messages and then "
                    f"nothing for {_CONFIRM_TIMEOUT_S:g} s"
                ) from None
        if self.nacked:
            raise BrokerUnavailableError(
                f"RabbitMQ refused {self.nacked} of {self.sent} run messages (nack)"
            )


class RabbitBroker(BrokerDriver):
    """The RabbitMQ half of :class:`~orchestrator.executors.celery.CeleryTransport`."""

    def publish(
        self,
        builder: MessageBuilder,
        items: Iterable[Publication],
        *,
        events: bool,
        check_size: SizeCheck,
    ) -> int:
        limit = self.settings.max_message_bytes
        queue = builder.queue
        published = 0
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
            channel = connection.channel()
            try:
                self.app.amqp.queues[queue].bind(channel).declare()
                channel.confirm_select()
                confirms = _Confirms(channel)
                producer = connection.Producer() if events else None
                sent = SentEvents(self.app, producer) if producer is not None else None
                for spec, attempt, label in items:
                    message = builder.build(spec, attempt, label)
                    body = message.body.encode()
                    if len(body) > limit:
                        check_size(message.body, spec)
                    channel.basic_publish(
                        Message(
                            body,
                            content_type=CONTENT_TYPE,
                            content_encoding=CONTENT_ENCODING,
                            application_headers=message.headers,
                            delivery_mode=2,
                            correlation_id=message.task_id,
                            reply_to="",
                            priority=0,
                        ),
                        exchange="",
                        routing_key=queue,
                    )
                    confirms.sent += 1
                    published += 1
                    if sent is not None:
                        sent.add(message)
                    if confirms.sent - confirms.upto >= CONFIRM_WINDOW:
                        confirms.wait(connection)
                confirms.wait(connection)
                if sent is not None:
                    sent.flush()
            finally:
                channel.close()
        return published

    def backlog(self, queue: str, *, delivered_within_s: float | None) -> int:
        """The messages ready in ``queue``, plus one per consumer while any are ready (see
        the module's docstring); 0 if the queue does not exist yet."""
        with self.app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
            ready, consumers = self._counts(connection, queue)
            return ready + consumers if ready else 0

    def dead_letters(self, queue: str, *, limit: int | None) -> list[DeadLetter]:
        name = dead_letter_key(queue)
        letters: list[DeadLetter] = []
        with self.app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
            if not self._message_count(connection, name):
                return []
            channel = connection.channel()
            try:
                while len(letters) < DEAD_LETTER_LIMIT:
                    message = channel.basic_get(queue=name, no_ack=False)
                    if message is None:
                        break
                    letters.append(DeadLetter.from_json(message.body))
            finally:
                channel.close()  # returns every message got, unacknowledged, to the queue
        letters.sort(key=lambda letter: letter.time, reverse=True)  # newest first, as on Redis
        return letters if limit is None else letters[: max(limit, 1)]

    def dead_letter_count(self, queue: str) -> int:
        with self.app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
            return self._message_count(connection, dead_letter_key(queue))

    def purge_dead_letters(self, queue: str) -> int:
        name = dead_letter_key(queue)
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
            if not self._message_count(connection, name):
                return 0
            channel = connection.channel()
            try:
                return int(channel.queue_purge(queue=name) or 0)
            finally:
                channel.close()

    @classmethod
    def _message_count(cls, connection: Any, queue: str) -> int:
        return cls._counts(connection, queue)[0]

    @staticmethod
    def _counts(connection: Any, queue: str) -> tuple[int, int]:
        """``queue``'s ready messages and consumers, (0, 0) when it does not exist (on a
        channel of its own: a passive declare of a missing queue closes the channel)."""
        from amqp.exceptions import NotFound

        channel = connection.channel()
        try:
            _, count, consumers = channel.queue_declare(queue=queue, passive=True)
            return int(count), int(consumers)
        except NotFound:
            return 0, 0
        finally:
            if channel.is_open:
                channel.close()
