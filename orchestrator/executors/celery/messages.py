"""The publisher's half of the run message (:mod:`orchestrator.contracts.wire`): build it.

The body is serialized here, once per run, with the standard library's JSON encoder, and
published as a pre-encoded ``application/json`` string; Celery's ``send_task`` builds the
same message through several layers of option merging, which costs most of its ~0.5 ms per
message. On Redis the message is pushed as kombu's envelope (:meth:`MessageBuilder.envelope`);
on RabbitMQ its body, headers and properties are an AMQP message of their own.

The ``task-sent`` event Celery sends per message when ``task_send_sent_event`` is on (so
Flower lists queued runs; studyq sends it only with ``STUDYQ_TASK_SENT_EVENTS``) has the
fields of Celery's event reference, plus the sender's ``hostname``, ``pid``, ``clock``,
``utcoffset`` and ``timestamp``, as ``EventDispatcher`` sends them
(:meth:`MessageBuilder.sent_event`); the publisher sends them in ``task.multi`` batches.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from orchestrator.contracts.runspec import RunSpec, SpecTexts
from orchestrator.contracts.wire import CONTENT_ENCODING, CONTENT_TYPE, TASK_NAME, run_message

__all__ = ["DeliveryTags", "MessageBuilder", "RunMessage"]

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_encode_text = json.encoder.encode_basestring  # how ``_encode`` writes a str (C version)


class DeliveryTags:
    """Unique delivery tags (kombu's Redis transport keys unacknowledged messages by them):
    UUIDs counted up from a random one, as unique as kombu's ``uuid4()`` per message without
    reading the system's random source for each."""

    def __init__(self) -> None:
        self._next = uuid.uuid4().int

    def __call__(self) -> str:
        self._next = (self._next + 1) & ((1 << 128) - 1)
        digits = f"{self._next:032x}"  # str(uuid.UUID(int=...)) without building the object
        return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


@dataclass(frozen=True, slots=True)
class RunMessage:
    """One encoded run message, ready for ``kombu.Producer.publish``."""

    task_id: str
    body: str
    headers: dict[str, Any]
    argsrepr: str
    kwargsrepr: str
    queue: str

    @property
    def sent_event(self) -> dict[str, Any]:
        """The fields of its ``task-sent`` event that come from the message (built only when
        events are sent: most publishes send none)."""
        return {
            "uuid": self.task_id,
            "root_id": self.task_id,
            "parent_id": None,
            "name": TASK_NAME,
            "args": self.argsrepr,
            "kwargs": self.kwargsrepr,
            "retries": 0,
            "eta": None,
            "expires": None,
            "queue": self.queue,
            "exchange": "",
            "routing_key": self.queue,
        }


_SLOT = "\x01studyq-slot-{}\x01"
"""A placeholder string no real value contains: where :class:`_EnvelopeTemplate` cuts."""


class _EnvelopeTemplate:
    """kombu's Redis envelope of one builder's messages as constant text between the few
    values that differ per message (body, task id, descriptions, delivery tag).

    Encoding the whole envelope with the JSON encoder per message walked the ~20 headers
    that are the same for every message of a publish call; cutting the encoded envelope at
    placeholders once, then joining the per-message values encoded as the encoder encodes a
    string, gives the same text for a fraction of the work.
    """

    VARIABLE_HEADERS = ("id", "root_id", "argsrepr", "kwargsrepr")
    """The headers :func:`~orchestrator.contracts.wire.run_message` sets per message."""

    def __init__(self, envelope: dict[str, Any]) -> None:
        slots = ["body", *self.VARIABLE_HEADERS, "correlation_id", "delivery_tag"]
        placeholders = {name: _SLOT.format(name) for name in slots}
        probe = {
            **envelope,
            "body": placeholders["body"],
            "headers": {
                **envelope["headers"],
                **{name: placeholders[name] for name in self.VARIABLE_HEADERS},
            },
            "properties": {
                **envelope["properties"],
                "correlation_id": placeholders["correlation_id"],
                "delivery_tag": placeholders["delivery_tag"],
            },
        }
        text = _encode(probe)
        cuts = sorted(
            (text.index(_encode_text(value)), name) for name, value in placeholders.items()
        )
        self.order = [name for _, name in cuts]
        self.parts: list[str] = []
        position = 0
        for start, name in cuts:
            self.parts.append(text[position:start])
            position = start + len(_encode_text(placeholders[name]))
        self.tail = text[position:]
        self.constant = {
            key: value for key, value in envelope["headers"].items()
            if key not in self.VARIABLE_HEADERS
        }  # fmt: skip
        self.size = len(envelope["headers"])

    def fits(self, headers: dict[str, Any]) -> bool:
        """Whether ``headers`` have this template's shape: the builder's ``origin`` and time
        limit (the other constant headers are literals of ``run_message``)."""
        constant = self.constant
        return (
            len(headers) == self.size
            and headers.get("origin") == constant["origin"]
            and headers.get("timelimit") == constant["timelimit"]
        )

    def fill(self, body_b64: str, message: RunMessage, delivery_tag: str) -> str:
        headers = message.headers
        values = {
            "body": body_b64,
            "id": headers["id"],
            "root_id": headers["root_id"],
            "argsrepr": headers["argsrepr"],
            "kwargsrepr": headers["kwargsrepr"],
            "correlation_id": message.task_id,
            "delivery_tag": delivery_tag,
        }
        pieces = []
        for part, name in zip(self.parts, self.order, strict=True):
            pieces.append(part)
            pieces.append(_encode_text(values[name]))
        pieces.append(self.tail)
        return "".join(pieces)


class MessageBuilder:
    """Builds the run messages of one publish call (queue, origin and time limit fixed).

    Args:
        queue: Queue (and routing key) the messages go to.
        origin: Who published them (``pid@host``), as Celery records it.
        hard_limit_s: Celery hard time limit for each run, or None for none.
    """

    def __init__(self, *, queue: str, origin: str, hard_limit_s: float | None) -> None:
        self.queue = queue
        self.origin = origin
        self.time_limit = [hard_limit_s, None]
        self._template: _EnvelopeTemplate | None = None
        self._texts = SpecTexts()  # what the runs of one publish share, encoded once

    @staticmethod
    def sent_event(
        message: RunMessage, *, hostname: str, pid: int, clock: int, utcoffset: float
    ) -> dict[str, Any]:
        """The ``task-sent`` event of ``message`` (``clock``: the app's Lamport clock,
        advanced by the caller for each event)."""
        return {
            **message.sent_event,
            "hostname": hostname,
            "utcoffset": utcoffset,
            "pid": pid,
            "clock": clock,
            "timestamp": time.time(),
            "type": "task-sent",
        }

    def envelope(self, message: RunMessage, delivery_tag: str) -> str:
        """``message`` as kombu's Redis transport keeps it in the queue's list: the envelope
        ``kombu.transport.virtual.Channel.basic_publish`` builds for a message published to
        the default exchange with ``message``'s routing (body base64-encoded, as the Redis
        channel's ``body_encoding``). Pushing it with ``LPUSH`` is what kombu's publish
        does, without its per-message layers (about 60% of publishing time).

        The text is the same as encoding the whole envelope, cut from a template made from
        the first message (:class:`_EnvelopeTemplate`); a message whose headers differ from
        the template's in more than the per-message values is encoded whole."""
        body = base64.b64encode(message.body.encode()).decode("ascii")
        template = self._template
        if template is None or not template.fits(message.headers):
            envelope = self._envelope(body, message, delivery_tag)
            if template is None:
                self._template = _EnvelopeTemplate(envelope)
            return _encode(envelope)
        return template.fill(body, message, delivery_tag)

    def _envelope(self, body: str, message: RunMessage, delivery_tag: str) -> dict[str, Any]:
        return {
            "body": body,
            "content-encoding": CONTENT_ENCODING,
            "content-type": CONTENT_TYPE,
            "headers": message.headers,
            "properties": {
                "correlation_id": message.task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": delivery_tag,
            },
        }

    @staticmethod
    def encode(value: Any) -> str:
        """Compact JSON, as every message body here is encoded."""
        return _encode(value)

    def build(self, spec: RunSpec, attempt: int, label: str) -> RunMessage:
        """The message for ``spec`` published for ``attempt``."""
        task_id, body, headers, argsrepr, kwargsrepr = run_message(
            spec,
            attempt,
            label=label,
            origin=self.origin,
            time_limit=self.time_limit,
            texts=self._texts,
        )
        return RunMessage(task_id, body, headers, argsrepr, kwargsrepr, self.queue)
