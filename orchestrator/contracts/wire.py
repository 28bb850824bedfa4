"""The run message on the wire: what the coordinator publishes and a worker accepts.

One Celery protocol-2 task message per run, JSON only, on either broker::

    headers  task="studyq.run", id="<run_id>.<index>.<attempt>", studyq_wire=1,
             argsrepr (readable in Flower), timelimit=[hard, None]
    body     [[], {"spec": RunSpec.to_message(), "attempt": <attempt at publish>}, embed]

The publisher (:mod:`orchestrator.executors.celery.messages`) builds it by hand, once per
run; the worker (:mod:`workers.tasks`) is plain Celery and refuses anything that is not
this: another task name, positional or unknown arguments, a newer ``studyq_wire`` than
:data:`WIRE_VERSION`, a content type other than JSON. A message without ``studyq_wire``
(sent with Celery's ``send_task``) is read as version 1.

The task id names the run and the attempt it was published for, so Flower shows one row per
delivery and a republished run gets a new row instead of overwriting the old one.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from orchestrator.contracts.runspec import RunSpec, SpecTexts

__all__ = [
    "CONTENT_ENCODING",
    "CONTENT_TYPE",
    "RUN_ARGUMENTS",
    "TASK_NAME",
    "WIRE_HEADER",
    "WIRE_VERSION",
    "RunMessageParts",
    "describe_run",
    "run_message",
    "task_id_for",
]

TASK_NAME = "studyq.run"
"""The one task a studyq worker executes."""

WIRE_VERSION = 1
"""The version of this message format; a worker refuses a message of a later one."""

WIRE_HEADER = "studyq_wire"
"""The message header that carries :data:`WIRE_VERSION`."""

RUN_ARGUMENTS = frozenset({"spec", "attempt"})
"""The run task's keyword arguments: ``spec`` is required, ``attempt`` defaults to 0."""

CONTENT_TYPE = "application/json"
CONTENT_ENCODING = "utf-8"

_REPR_LIMIT = 200


def task_id_for(spec: RunSpec, attempt: int) -> str:
    """``<run_id>.<index>.<attempt>``: unique per delivery, and says which run it is.

    The plan index is part of it because designs that repeat a level repeat run ids.
    """
    return f"{spec.run_id}.{spec.index}.{attempt}"


def describe_run(spec: RunSpec, label: str) -> str:
    """What Flower shows as the task's arguments, e.g.
    ``study=quickstart cond=random | small agent=random-search problem=beam-design rep=3``."""
    text = (
        f"study={spec.study_id} cond={label or spec.condition_id} agent={spec.agent_key or '-'} "
        f"problem={spec.problem_key or '-'} rep={spec.replicate}"
    )
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


_EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_EMBED_TEXT = _encode(_EMBED)


class RunMessageParts(NamedTuple):
    """A run message's task id, JSON body and Celery headers."""

    task_id: str
    body: str
    headers: dict[str, Any]
    argsrepr: str
    kwargsrepr: str


def run_message(
    spec: RunSpec,
    attempt: int,
    *,
    label: str,
    origin: str,
    time_limit: list[float | None],
    texts: SpecTexts | None = None,
) -> RunMessageParts:
    """The run message of ``spec`` published for ``attempt``: what the coordinator publishes
    and what a worker re-publishes for a retry, built in one place so both are the same.

    ``texts``: a publisher of many runs passes one :class:`SpecTexts` for all of them, so
    what their specs share is encoded once; the body is the same either way."""
    task_id = task_id_for(spec, attempt)
    argsrepr = describe_run(spec, label)
    kwargsrepr = f"run={spec.run_id} index={spec.index} attempt={attempt} seed={spec.seed}"
    spec_text = (texts or SpecTexts()).message(spec)
    body = f'[[],{{"spec":{spec_text},"attempt":{int(attempt)}}},{_EMBED_TEXT}]'
    headers: dict[str, Any] = {
        "lang": "py",
        "task": TASK_NAME,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": time_limit,
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": argsrepr,
        "kwargsrepr": kwargsrepr,
        "origin": origin,
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        WIRE_HEADER: WIRE_VERSION,
    }
    return RunMessageParts(task_id, body, headers, argsrepr, kwargsrepr)
