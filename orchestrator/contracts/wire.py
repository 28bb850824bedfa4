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

from orchestrator.contracts.runspec import RunSpec

__all__ = [
    "CONTENT_ENCODING",
    "CONTENT_TYPE",
    "RUN_ARGUMENTS",
    "TASK_NAME",
    "WIRE_HEADER",
    "WIRE_VERSION",
    "describe_run",
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
