"""What a worker accepts from the broker, checked before kombu or Celery touch the message.

:func:`inspect_envelope` takes one item exactly as it came off a Redis list and either returns
the decoded kombu envelope, which kombu and Celery can then handle without an exception, or
raises :class:`Poison` with a :class:`~orchestrator.contracts.deadletters.Reason` and a readable
detail. It is a plain function, tested without Redis or Celery; the transport
(:mod:`workers.quarantine`) moves poison to the dead-letter list. A message is accepted only
if it is what studyq's publisher (:mod:`orchestrator.contracts.wire`) or Celery's ``send_task`` with
the JSON serializer sends:

* at most ``max_bytes``, JSON, a kombu envelope whose fields have kombu's types
  (``properties.delivery_tag``, ``delivery_info.exchange``/``routing_key``, ...);
* ``application/json`` in ``utf-8``, the body base64 in the envelope, no compression;
* for a task queue, a Celery protocol-2 task message: ``headers.task`` and ``headers.id``,
  the headers Celery reads with the types it expects (no ETA, no expiry: studyq never
  schedules runs), the body ``[args, kwargs, embed]`` without callbacks, errbacks, chains or
  chords, and a task the worker executes.

Whether the arguments are a run message is the run task's business
(:class:`workers.runtask.InvalidRunMessage`), and whether it is the registered run is the
store's.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Collection, Mapping
from typing import Any

from kombu.utils import json as _kombu_json

from orchestrator.contracts.deadletters import Reason

__all__ = ["Poison", "inspect_envelope"]

_JSON = "application/json"
_KOMBU_LOADS: Callable[[str], Any] = _kombu_json.loads

SERIALIZER_NAMES = {
    "application/x-python-serialize": "pickle",
    "application/x-yaml": "yaml",
    "application/x-msgpack": "msgpack",
    "application/data": "raw binary",
    "application/text": "raw text",
}
"""Content types of kombu's other serializers, named in the refusal."""


class Poison(Exception):
    """A message to quarantine: why, in words, and its task id when it has a readable one."""

    def __init__(self, reason: Reason, detail: str, task_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.task_id = task_id


def _optional(kind: type | tuple[type, ...]) -> Callable[[Any], bool]:
    return lambda value: value is None or (isinstance(value, kind) and not isinstance(value, bool))


def _timelimit(value: Any) -> bool:
    if value is None:
        return True
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(
            limit is None
            or (isinstance(limit, int | float) and not isinstance(limit, bool) and limit >= 0)
            for limit in value
        )
    )


_HEADER_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lang": (_optional(str), "a string"),
    "root_id": (_optional(str), "a string"),
    "parent_id": (_optional(str), "a string"),
    "group": (_optional(str), "a string"),
    "group_index": (_optional(int), "a whole number"),
    "shadow": (_optional(str), "a string"),
    "argsrepr": (_optional(str), "a string"),
    "kwargsrepr": (_optional(str), "a string"),
    "origin": (_optional(str), "a string"),
    "retries": (_optional(int), "a whole number"),
    "replaced_task_nesting": (_optional(int), "a whole number"),
    "ignore_result": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "timelimit": (_timelimit, "[hard, soft] seconds"),
    "eta": (lambda v: v is None, "null (studyq never schedules a run)"),
    "countdown": (lambda v: v is None, "null (studyq never schedules a run)"),
    "expires": (lambda v: v is None, "null (studyq never expires a run)"),
    "stamped_headers": (_optional(list), "a list"),
    "stamps": (_optional(dict), "an object"),
}
"""Headers Celery's worker reads, and the value each must have (absent is fine)."""

_EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")
"""Work Celery would start after the task: never part of a studyq run message."""


def _loads(text: str) -> Any:
    """JSON as kombu decodes it (its object hook turns tagged values into Python objects)."""
    return _KOMBU_LOADS(text)


def _field(
    mapping: Mapping[str, Any], key: str, kind: type, where: str, task_id: str | None
) -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Poison(
            Reason.NOT_ENVELOPE,
            f"{where}{key} is {_kind(value)}, not {kind.__name__}: not a kombu message",
            task_id,
        )
    return value


def _task_id(headers: Any) -> str | None:
    """The task id of a message, if its headers have a readable one (for the dead letter)."""
    value = headers.get("id") if isinstance(headers, dict) else None
    return value[:200] if isinstance(value, str) else None


def _kind(value: Any) -> str:
    return "missing" if value is None else type(value).__name__


def inspect_envelope(
    raw: bytes | str,
    *,
    max_bytes: int,
    tasks: Collection[str] | None = None,
) -> dict[str, Any]:
    """The kombu envelope in ``raw``, checked as the module docstring says.

    Args:
        raw: One item as the Redis list held it.
        max_bytes: ``STUDYQ_MAX_MESSAGE_BYTES``.
        tasks: The task names the worker executes: the message is checked as a task message
            of one of them. None for a broadcast (control, events): only the envelope.

    Raises:
        Poison: why the message is not accepted.
    """
    size = len(raw)
    if size > max_bytes:
        raise Poison(
            Reason.TOO_LARGE,
            f"the message is {size:,} bytes, over STUDYQ_MAX_MESSAGE_BYTES ({max_bytes:,})",
        )
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        payload = _loads(text)
    except Exception as error:  # kombu's hook and the decoder raise many types
        raise Poison(Reason.NOT_JSON, f"the message is not JSON: {error}"[:300]) from None
    return check_envelope(payload, tasks=tasks)


def check_envelope(payload: Any, *, tasks: Collection[str] | None = None) -> dict[str, Any]:
    """:func:`inspect_envelope` for an envelope already decoded (a broadcast)."""
    if not isinstance(payload, dict):
        raise Poison(Reason.NOT_ENVELOPE, f"the message is a JSON {_kind(payload)}, not an object")
    headers = payload.get("headers")
    task_id = _task_id(headers)
    properties = _field(payload, "properties", dict, "", task_id)
    _field(properties, "delivery_tag", str, "properties.", task_id)
    info = _field(properties, "delivery_info", dict, "properties.", task_id)
    _field(info, "exchange", str, "properties.delivery_info.", task_id)
    _field(info, "routing_key", str, "properties.delivery_info.", task_id)
    priority = properties.get("priority")
    if priority is not None and not (
        isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 255
    ):
        raise Poison(
            Reason.NOT_ENVELOPE, f"properties.priority is {priority!r:.80}, not 0..255", task_id
        )
    if headers is not None and not isinstance(headers, dict):
        raise Poison(Reason.NOT_ENVELOPE, f"headers is a {_kind(headers)}, not an object")
    headers = headers or {}
    body = _decoded_body(payload, properties, headers, task_id)
    if tasks is not None:
        _check_task_message(headers, body, tasks, task_id)
    return payload


def _decoded_body(
    payload: dict[str, Any],
    properties: dict[str, Any],
    headers: dict[str, Any],
    task_id: str | None,
) -> Any:
    """The message body, decoded as kombu and Celery would decode it."""
    content_type = payload.get("content-type")
    if content_type != _JSON:
        name = SERIALIZER_NAMES.get(str(content_type), "")
        raise Poison(
            Reason.CONTENT_TYPE,
            f"refused content type {str(content_type)[:80]!r}"
            + (f" ({name})" if name else "")
            + f": only {_JSON} is accepted, nothing else is deserialized",
            task_id,
        )
    encoding = payload.get("content-encoding")
    if not isinstance(encoding, str) or encoding.lower() != "utf-8":
        raise Poison(Reason.ENCODING, f"content-encoding {encoding!r}, not utf-8", task_id)
    if "compression" in headers:
        raise Poison(Reason.COMPRESSED, f"compressed ({headers['compression']!r})", task_id)
    body_encoding = properties.get("body_encoding")
    if body_encoding != "base64":
        raise Poison(Reason.ENCODING, f"body_encoding {body_encoding!r}, not base64", task_id)
    body = payload.get("body")
    if not isinstance(body, str):
        raise Poison(Reason.NOT_ENVELOPE, f"body is {_kind(body)}, not a string", task_id)
    try:
        text = base64.b64decode(body, validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as error:
        detail = f"the body is not base64 of utf-8: {error}"
        raise Poison(Reason.ENCODING, detail, task_id) from None
    try:
        return _loads(text)
    except Exception as error:  # kombu's hook and the decoder raise many types
        raise Poison(Reason.BAD_BODY, f"the body is not JSON: {error}"[:300], task_id) from None


def _check_task_message(
    headers: dict[str, Any], body: Any, tasks: Collection[str], task_id: str | None
) -> None:
    name = headers.get("task")
    if not isinstance(name, str) or not isinstance(headers.get("id"), str):
        raise Poison(
            Reason.PROTOCOL,
            "not a Celery protocol-2 task message (headers.task and headers.id must be strings)",
            task_id,
        )
    if name not in tasks:
        raise Poison(
            Reason.UNKNOWN_TASK,
            f"task {name[:100]!r} is not one this worker executes ({', '.join(sorted(tasks))})",
            task_id,
        )
    for header, (valid, expected) in _HEADER_CHECKS.items():
        if not valid(headers.get(header)):
            raise Poison(
                Reason.PROTOCOL,
                f"headers.{header} is {str(headers.get(header))[:80]!r}, not {expected}",
                task_id,
            )
    if not (
        isinstance(body, list)
        and len(body) == 3
        and isinstance(body[0], list)
        and isinstance(body[1], dict)
        and (body[2] is None or isinstance(body[2], dict))
    ):
        raise Poison(
            Reason.PROTOCOL,
            "the body is not a protocol-2 task body [args, kwargs, embed]",
            task_id,
        )
    embed = body[2] or {}
    started = [key for key in _EMBED_KEYS if embed.get(key)]
    if started:
        raise Poison(
            Reason.PROTOCOL,
            f"the message asks for follow-up work ({', '.join(started)}); a run starts nothing",
            task_id,
        )
