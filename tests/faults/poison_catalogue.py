"""Hostile messages, as bytes for a raw ``LPUSH`` onto a queue, each with the reason a worker
must quarantine it for. Built around a genuine run message of the study under test, so each
one differs from a message a worker would execute in one way only."""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.contracts.deadletters import Reason
from orchestrator.contracts.runspec import RunSpec
from orchestrator.executors.celery.messages import MessageBuilder

LARGE_BYTES = 1024 * 1024 + 4096
"""Just over the default STUDYQ_MAX_MESSAGE_BYTES (1 MiB)."""


@dataclass(frozen=True)
class Hostile:
    """One hostile message: a name, its bytes, why it must be quarantined, its task id."""

    name: str
    raw: bytes
    reason: Reason
    task_id: str | None = None


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def genuine(queue: str, spec: RunSpec, task_id: str) -> dict[str, Any]:
    """The envelope studyq's publisher pushes for ``spec``, with task id ``task_id``."""
    builder = MessageBuilder(queue=queue, origin="attacker@test", hard_limit_s=None)
    message = builder.build(spec, 0, "label")
    envelope: dict[str, Any] = json.loads(builder.envelope(message, f"tag-{task_id}"))
    envelope["headers"]["id"] = envelope["headers"]["root_id"] = task_id
    return envelope


def _body(envelope: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(envelope["body"]))


def hostile_messages(queue: str, spec: RunSpec) -> list[Hostile]:
    """At least 25 distinct hostile messages for ``queue``; ``spec`` is a real run of the
    study (the messages built from it never carry a spec the store would accept)."""
    made: list[Hostile] = []

    def raw(name: str, data: bytes, reason: Reason) -> None:
        made.append(Hostile(name, data, reason))

    def edited(name: str, reason: Reason, edit: Callable[[dict[str, Any]], object]) -> None:
        task_id = f"poison-{len(made):02d}-{name}"
        envelope = genuine(queue, spec, task_id)
        edit(envelope)
        headers = envelope.get("headers")
        readable = reason is not Reason.TOO_LARGE  # a message too large is not parsed
        known = task_id if isinstance(headers, dict) and headers.get("id") == task_id else None
        known = known if readable else None
        made.append(Hostile(name, json.dumps(envelope).encode(), reason, known))

    def body(value: Any) -> Callable[[dict[str, Any]], object]:
        return lambda envelope: envelope.update(body=_b64(json.dumps(value)))

    def kwargs(**values: Any) -> Callable[[dict[str, Any]], object]:
        def edit(envelope: dict[str, Any]) -> None:
            args, kw, embed = _body(envelope)
            kw.update(values)
            envelope["body"] = _b64(json.dumps([args, kw, embed]))

        return edit

    # -- not JSON, not an envelope -----------------------------------------------------------
    raw("not json", b"not json", Reason.NOT_JSON)
    raw("truncated json", b'{"body": "W10=", "properties": {', Reason.NOT_JSON)
    raw("not utf-8", b"\xff\xfe\x00garbage", Reason.NOT_JSON)
    raw("kombu tagged value", b'{"__type__": "datetime", "__value__": "garbage"}', Reason.NOT_JSON)
    raw("deep nesting", b"[" * 100_000, Reason.NOT_JSON)
    raw("a number", b"5", Reason.NOT_ENVELOPE)
    raw("a list", b'["a", "list"]', Reason.NOT_ENVELOPE)
    raw("body 5 only", b'{"body": 5}', Reason.NOT_ENVELOPE)
    edited("no delivery tag", Reason.NOT_ENVELOPE, lambda e: e["properties"].pop("delivery_tag"))
    edited(
        "delivery tag int", Reason.NOT_ENVELOPE, lambda e: e["properties"].update(delivery_tag=7)
    )
    edited(
        "no routing key",
        Reason.NOT_ENVELOPE,
        lambda e: e["properties"]["delivery_info"].pop("routing_key"),
    )
    edited("headers a string", Reason.NOT_ENVELOPE, lambda e: e.update(headers="task=studyq.run"))
    edited("priority a word", Reason.NOT_ENVELOPE, lambda e: e["properties"].update(priority="hi"))
    edited("body an int", Reason.NOT_ENVELOPE, lambda e: e.update(body=5))
    # -- other serializers, encodings, compression -------------------------------------------
    edited(
        "pickle",
        Reason.CONTENT_TYPE,
        lambda e: e.update(
            {"content-type": "application/x-python-serialize", "body": _b64(pickle.dumps([1]))}
        ),
    )
    edited("yaml", Reason.CONTENT_TYPE, lambda e: e.update({"content-type": "application/x-yaml"}))
    edited(
        "msgpack",
        Reason.CONTENT_TYPE,
        lambda e: e.update({"content-type": "application/x-msgpack"}),
    )
    edited("no content type", Reason.CONTENT_TYPE, lambda e: e.pop("content-type"))
    edited("binary encoding", Reason.ENCODING, lambda e: e.update({"content-encoding": "binary"}))
    edited("body not base64", Reason.ENCODING, lambda e: e.update(body="!!notbase64"))
    edited("body latin-1", Reason.ENCODING, lambda e: e.update(body=_b64(b"\xe9t\xe9")))
    edited(
        "raw body encoding", Reason.ENCODING, lambda e: e["properties"].update(body_encoding=None)
    )
    edited(
        "gzip", Reason.COMPRESSED, lambda e: e["headers"].update(compression="application/x-gzip")
    )
    edited("body not json", Reason.BAD_BODY, lambda e: e.update(body=_b64("not json")))
    edited(
        "too large",
        Reason.TOO_LARGE,
        lambda e: e["headers"].update(argsrepr="x" * LARGE_BYTES),
    )
    # -- not a Celery protocol-2 message of the run task -------------------------------------
    edited(
        "protocol 1",
        Reason.PROTOCOL,
        lambda e: e.update(
            headers={},
            body=_b64(json.dumps({"task": "studyq.run", "id": "p1", "args": [], "kwargs": {}})),
        ),
    )
    edited("no task id", Reason.PROTOCOL, lambda e: e["headers"].pop("id"))
    edited("eta", Reason.PROTOCOL, lambda e: e["headers"].update(eta="2030-01-01T00:00:00"))
    edited("timelimit a word", Reason.PROTOCOL, lambda e: e["headers"].update(timelimit="abc"))
    edited("body an object", Reason.PROTOCOL, body({"spec": spec.to_message()}))
    edited(
        "callbacks",
        Reason.PROTOCOL,
        body([[], {"spec": spec.to_message()}, {"callbacks": [{"task": "studyq.run"}]}]),
    )
    edited("unknown task", Reason.UNKNOWN_TASK, lambda e: e["headers"].update(task="evil.task"))
    edited(
        "celery builtin task",
        Reason.UNKNOWN_TASK,
        lambda e: e["headers"].update(task="celery.backend_cleanup"),
    )
    # -- the run task's arguments ------------------------------------------------------------
    edited("spec an int", Reason.INVALID_RUN, kwargs(spec=5))
    edited("spec missing fields", Reason.INVALID_RUN, kwargs(spec={"study_id": spec.study_id}))
    edited("attempt a word", Reason.INVALID_RUN, kwargs(attempt="abc"))
    edited("unknown argument", Reason.INVALID_RUN, kwargs(evil=1))
    edited("positional args", Reason.INVALID_RUN, body([[1, 2], {}, None]))
    edited("no spec", Reason.INVALID_RUN, body([[], {"attempt": 0}, None]))
    return made
