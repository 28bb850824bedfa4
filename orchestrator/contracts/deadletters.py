"""The dead letters of a queue: where they are kept, their bound, and the format of one entry.

A message a worker cannot decode or does not recognise (see :mod:`workers.poison`) is not
executed and not redelivered: the worker pushes one :class:`DeadLetter` onto the list
``studyq.dead.<queue>`` in the broker (newest first, trimmed to :data:`DEAD_LETTER_LIMIT`)
and acknowledges the message; on RabbitMQ ``studyq.dead.<queue>`` is a queue of that name,
bounded the same way (:data:`DEAD_LETTER_QUEUE_ARGUMENTS`). ``studyq dead-letters`` reads
and purges them through the Celery transport (:mod:`orchestrator.executors.celery`). Both
sides take the key, the bounds and the entry format from here, and nothing here touches
Redis, Celery or kombu.

One entry is a JSON object::

    {"reason": "not_json", "detail": "the message is not JSON: Expecting value ...",
     "time": "2026-12-06T20:01:02.123456+00:00", "queue": "studyq",
     "worker": "celery@host:4242", "task_id": null, "size": 8, "raw": "not json"}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "DEAD_LETTER_LIMIT",
    "DEAD_LETTER_PREFIX",
    "DEAD_LETTER_QUEUE_ARGUMENTS",
    "RAW_LIMIT",
    "DeadLetter",
    "Reason",
    "dead_letter_key",
]

DEAD_LETTER_PREFIX = "studyq.dead."
"""Key prefix of the dead-letter lists; kombu's ``global_keyprefix``, if any, comes first."""

DEAD_LETTER_LIMIT = 10_000
"""Entries kept per queue (older ones are trimmed): a flood of junk cannot fill Redis."""

DEAD_LETTER_QUEUE_ARGUMENTS = {"x-max-length": DEAD_LETTER_LIMIT, "x-overflow": "drop-head"}
"""Arguments of a RabbitMQ dead-letter queue (durable, classic): the oldest letters go first
when it is full, as the Redis list is trimmed."""

RAW_LIMIT = 4096
"""Characters of the raw message kept in an entry: enough to see what it was."""


class Reason(StrEnum):
    """Why a message was quarantined; the first word of its log line and its entry."""

    TOO_LARGE = "too_large"  # over STUDYQ_MAX_MESSAGE_BYTES
    NOT_JSON = "not_json"  # the broker's item is not JSON
    NOT_ENVELOPE = "not_envelope"  # JSON, but not kombu's envelope (fields missing/ill-typed)
    CONTENT_TYPE = "content_type"  # not application/json: pickle, yaml, msgpack, ...
    ENCODING = "encoding"  # content or body encoding not utf-8/base64, bad base64
    COMPRESSED = "compressed"  # a compression header: studyq never compresses
    BAD_BODY = "bad_body"  # the decoded body is not JSON
    PROTOCOL = "protocol"  # not a Celery protocol-2 task message (headers, body frame)
    UNKNOWN_TASK = "unknown_task"  # a task this worker does not execute
    INVALID_TASK = "invalid_task"  # Celery refused the task message itself
    INVALID_RUN = "invalid_run"  # the run task's arguments are not a run message
    MISMATCH = "mismatch"  # a run message that disagrees with the store (forged or stale)
    UNKNOWN_STUDY = "unknown_study"  # its study left the database (deleted): see workers.foreign


def dead_letter_key(queue: str, *, prefix: str = "") -> str:
    """The Redis list (or RabbitMQ queue) of ``queue``'s dead letters. ``prefix`` is kombu's
    ``global_keyprefix``: read and write the list with a client that does not add it itself
    (kombu's prefixing client prefixes ``LPUSH`` but not ``LTRIM`` or ``LRANGE``)."""
    return f"{prefix}{DEAD_LETTER_PREFIX}{queue}"


def _clip(raw: str) -> str:
    return raw if len(raw) <= RAW_LIMIT else raw[:RAW_LIMIT]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One quarantined message: why, when, where, who, and what it was (clipped)."""

    reason: str
    detail: str
    time: str  # UTC, ISO 8601
    queue: str
    worker: str
    task_id: str | None
    size: int  # bytes of the message as it arrived
    raw: str  # its first RAW_LIMIT characters

    @classmethod
    def new(
        cls,
        reason: Reason,
        detail: str,
        *,
        queue: str,
        worker: str,
        raw: bytes | str,
        task_id: str | None = None,
        now: datetime | None = None,
    ) -> DeadLetter:
        """An entry stamped now (UTC), the raw message decoded leniently and clipped."""
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "replace"))
        return cls(
            reason=str(reason),
            detail=detail,
            time=(now or datetime.now(UTC)).isoformat(),
            queue=queue,
            worker=worker,
            task_id=task_id,
            size=size,
            raw=_clip(text),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: bytes | str) -> DeadLetter:
        """An entry as stored; an entry nobody could parse (someone else wrote the list)
        comes back as reason ``unreadable`` with its text as ``raw``, never an error."""
        try:
            data: Any = json.loads(text)
            return cls(
                reason=str(data["reason"]),
                detail=str(data.get("detail", "")),
                time=str(data["time"]),
                queue=str(data["queue"]),
                worker=str(data.get("worker", "")),
                task_id=None if data.get("task_id") is None else str(data["task_id"]),
                size=int(data.get("size", 0)),
                raw=str(data.get("raw", "")),
            )
        except (ValueError, TypeError, KeyError):
            raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
            return cls("unreadable", "not a studyq dead-letter entry", "", "", "", None,
                       len(raw), _clip(raw))  # fmt: skip

    def preview(self, width: int = 60) -> str:
        """The raw message on one line, at most ``width`` characters."""
        flat = " ".join(self.raw.split())
        return flat if len(flat) <= width else flat[: width - 3] + "..."
