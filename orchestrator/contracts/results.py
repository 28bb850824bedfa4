"""The run-result contract: what executing one run produces, and what the store records.

Both executors produce a :class:`RunResult` through the same function in ``workers/`` and
hand it to the store, which writes it, with its evaluations and events, in the one
transaction that makes the run terminal. A run that fails, whoever notices (the run itself,
the lease keeper's hard limit, the prefork parent, a study that cannot run), is built by
:func:`failed_result`, so every failed row carries the same provenance keys
(:data:`FAILED_PROVENANCE_KEYS`) and the same bounds on its message and traceback.
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from orchestrator.contracts.runspec import RunSpec

__all__ = [
    "FAILED_PROVENANCE_KEYS",
    "MESSAGE_LIMIT",
    "TRACEBACK_LIMIT",
    "ErrorKind",
    "RunResult",
    "RunStatus",
    "bounded",
    "failed_result",
    "process_provenance",
]

MESSAGE_LIMIT = 4_096
"""Characters of an error message a result keeps: enough for any useful message, and a
10 MB ``str(exc)`` never reaches a million-row table."""

TRACEBACK_LIMIT = 8_192
"""Characters of a traceback a result keeps; the frames nearest the error are the useful
ones, and a recursion error's 100 KB traceback should not bloat the table."""

FAILED_PROVENANCE_KEYS = (
    "execution_mode",
    "agent_id",
    "problem_id",
    "host",
    "pid",
    "python_version",
    "package_versions",
    "worker",
)
"""The provenance of every failed result, whoever built it (``None`` where not known)."""


class RunStatus(StrEnum):
    """Lifecycle of a run in the store (DESIGN.md, "Run lifecycle")."""

    PLANNED = "planned"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """Terminal runs are never executed again unless resubmitted."""
        return self in {RunStatus.SUCCESS, RunStatus.FAILED, RunStatus.CANCELLED}


class ErrorKind(StrEnum):
    """Why a run failed; ``studyq resubmit --error`` and ``status`` group by it."""

    ERROR = "error"  # the agent, problem or evaluator raised
    TIMEOUT = "timeout"  # execution.timeout_s exceeded
    BINDING = "binding"  # reference unresolvable or not on the allow-list
    LOST = "lost"  # the worker vanished more than max_attempts times
    CANCELLED = "cancelled"


@dataclass(slots=True)
class RunResult:
    """Everything one attempt of one run produced.

    ``metrics`` carries the upstream's run metrics (``latency_s``, ``cost_usd``,
    ``input_tokens``, ``output_tokens``, ``primary_outcome`` and any process metrics).
    ``evaluations`` are rows with the evaluations.csv columns (``evaluator_id``,
    ``metric_name``, ``metric_value``, ``metric_unit``, ``aggregation_level``,
    ``notes_json``); ``events`` rows carry the events.csv columns.
    """

    run_id: str
    status: RunStatus
    started_at: datetime
    ended_at: datetime
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    trace_refs: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    error_kind: ErrorKind | None = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None

    @property
    def latency_s(self) -> float:
        """Wall time of the attempt in seconds."""
        return (self.ended_at - self.started_at).total_seconds()

    @property
    def error_info(self) -> str:
        """The upstream's ``error_info`` cell: ``"<ExceptionType>: <msg>"`` or empty."""
        if self.error_type is None:
            return ""
        return f"{self.error_type}: {self.error_message or ''}"


def bounded(text: str, limit: int) -> str:
    """``text`` cut to under ``limit`` characters, keeping its start and its end."""
    if len(text) <= limit:
        return text
    head = limit // 8
    tail = limit - head - 64
    cut = len(text) - head - tail
    return f"{text[:head]}\n... [{cut} characters cut] ...\n{text[-tail:]}"


_process_info: dict[str, Any] = {}


def process_provenance(worker: str) -> dict[str, Any]:
    """Where a run executed (``host``, ``pid``, ``python_version``, ``package_versions``,
    ``worker``); computed once per process (and again after a fork)."""
    pid = os.getpid()
    if _process_info.get("pid") != pid:
        _process_info.clear()
        _process_info.update(
            host=socket.gethostname(),
            pid=pid,
            python_version=platform.python_version(),
            package_versions={"studyq": _version("studyq"), "numpy": _version("numpy")},
        )
    return {**_process_info, "worker": worker}


@cache  # each lookup scans the installed distributions' metadata (2 ms)
def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not-installed"


def failed_result(
    spec: RunSpec,
    kind: ErrorKind,
    *,
    error_type: str,
    message: str,
    started_at: datetime,
    worker: str,
    execution_mode: str | None = None,
    latency_s: float | None = None,
    traceback: str | None = None,
) -> RunResult:
    """The one builder of a failed :class:`RunResult`.

    Args:
        spec: The run (its ids name the result and fill the provenance).
        kind: Why it failed.
        error_type: The exception's class name (or what stands for it).
        message: What went wrong; kept to :data:`MESSAGE_LIMIT`.
        started_at: When the attempt started; it ends now.
        worker: The executing worker's name.
        execution_mode: ``"agent"`` or ``"condition_runner"`` when known.
        latency_s: The attempt's measured duration; else ``ended_at - started_at``.
        traceback: The formatted traceback, if any; kept to :data:`TRACEBACK_LIMIT`.
    """
    ended_at = datetime.now(UTC)
    if latency_s is None:
        latency_s = (ended_at - started_at).total_seconds()
    provenance: dict[str, Any] = {
        "execution_mode": execution_mode,
        "agent_id": spec.agent_key,
        "problem_id": spec.problem_key,
        **process_provenance(worker),
    }
    return RunResult(
        run_id=spec.run_id,
        status=RunStatus.FAILED,
        started_at=started_at,
        ended_at=ended_at,
        metrics={"latency_s": latency_s},
        provenance=provenance,
        error_kind=kind,
        error_type=error_type,
        error_message=bounded(message, MESSAGE_LIMIT),
        traceback=None if traceback is None else bounded(traceback, TRACEBACK_LIMIT),
    )
