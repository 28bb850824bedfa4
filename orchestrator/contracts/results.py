"""The run-result contract: what executing one run produces, and what the store records.

Both executors produce a :class:`RunResult` through the same function in ``workers/`` and
hand it to the store, which writes it, with its evaluations and events, in the one
transaction that makes the run terminal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

__all__ = ["ErrorKind", "RunResult", "RunStatus"]


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
