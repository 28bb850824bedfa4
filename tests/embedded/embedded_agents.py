"""Agents of the embedded-sweep tests, bound by the test studies' ``bindings`` section.

``studyq run`` subprocesses (and their pool workers) import this module through
``PYTHONPATH``; the in-process API tests pass :func:`doubling` as an ``agent_bindings`` value.

Every counting agent appends its run id as one line to the file named by
:data:`CALLS_ENV`, with a single ``O_APPEND`` write, so concurrent pool processes never clobber
each other's lines: the file says how many times each run's agent really executed.
"""

from __future__ import annotations

import os
import time
from typing import Any

from workers.demo.agents import flaky
from workers.execution import RunCondition

CALLS_ENV = "STUDYQ_TEST_CALLS_FILE"
"""Environment variable naming the call-counter file (unset: nothing is counted)."""


def record_call(run_id: str) -> None:
    """Append ``run_id`` to the counter file in one atomic ``O_APPEND`` write."""
    path = os.environ.get(CALLS_ENV)
    if not path:
        return
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, f"{run_id}\n".encode("ascii"))
    finally:
        os.close(descriptor)


def counted(condition: RunCondition, seed: int, request_id: str) -> dict[str, Any]:
    """Counts the call, sleeps the factor ``sleep_s`` (default 0), returns seed-derived output."""
    record_call(request_id)
    seconds = float(condition.factor_assignments.get("sleep_s", 0.0))
    if seconds > 0:
        time.sleep(seconds)
    return {"output": {"seed": seed, "text": f"run {request_id}"}, "metrics": {"score": seed % 97}}


def counted_flaky(condition: RunCondition, seed: int, request_id: str) -> dict[str, Any]:
    """Counts the call, then behaves as the demo ``flaky`` agent (raises when ``fail``)."""
    record_call(request_id)
    return flaky(condition, seed)


def doubling(seed: int, factors: dict[str, Any]) -> dict[str, Any]:
    """A module-level in-process agent for the Python API tests (picklable by reference)."""
    return {"output": {"doubled": seed * 2, "arm": factors.get("arm")}}
