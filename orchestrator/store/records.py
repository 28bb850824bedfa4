"""Plain values the store hands out: claims, reports and read-only records.

They are frozen dataclasses, detached from any session, so callers can keep them after the
transaction that produced them has closed and pass them between threads and processes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from orchestrator.contracts.runspec import RunSpec
from orchestrator.store.columns import (
    EVALUATION_COLUMNS,
    EVENT_COLUMNS,
    EvaluationFields,
    EventFields,
    RunResultFields,
)

__all__ = [
    "AttemptRecord",
    "Claim",
    "ConditionRecord",
    "ErrorSummary",
    "EvaluationRecord",
    "EventRecord",
    "ProgressStats",
    "ReconcileReport",
    "RegisterReport",
    "RunRecord",
    "StudyInfo",
    "TakeBackReport",
    "publishable",
    "spec_from_row",
]


def spec_from_row(study_id: str, row: Any) -> RunSpec:
    """Rebuild a RunSpec from a row with the ``SPEC_COLUMNS`` of ``runs``."""
    return RunSpec(
        study_id=study_id,
        run_id=row.run_id,
        condition_id=row.condition_id,
        replicate=row.replicate,
        seed=row.seed,
        agent_id=row.agent_id,
        problem_id=row.problem_id,
        factor_assignments=dict(row.factor_assignments),
        block_assignments=dict(row.block_assignments),
        index=row.plan_index,
        condition_fingerprint=row.condition_fingerprint,
    )


def publishable(study_id: str, rows: Iterable[Any]) -> list[tuple[RunSpec, int]]:
    """``(spec, attempt)`` of rows with the ``SPEC_COLUMNS`` and ``attempt``, in plan order:
    what a caller publishes (or revokes) after the commit."""
    return sorted(
        ((spec_from_row(study_id, row), row.attempt) for row in rows), key=lambda p: p[0].index
    )


@dataclass(frozen=True, slots=True)
class Claim:
    """Proof that ``worker`` holds attempt ``attempt`` of one run until the lease expires.

    Pass it back to ``heartbeat``, ``finish_run`` and ``release_run``: those transitions only
    win while the run is still ``running`` at this attempt for this worker, which is what keeps
    a stale attempt from overwriting a newer one.
    """

    study_id: str
    index: int
    run_id: str
    attempt: int
    worker: str
    lease_expires_at: datetime


@dataclass(frozen=True, slots=True)
class RegisterReport:
    """What ``register_study`` did; ``created`` is False when it was already registered."""

    study_id: str
    created: bool
    definition_hash: str
    run_count: int
    condition_count: int


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What one reconcile pass changed, and which runs the caller must publish again.

    Publishing happens after the transaction committed (a message for a row that was rolled
    back would be claimed for nothing), so the runs are returned rather than published.
    """

    study_id: str
    requeued: int = 0
    """Running rows whose lease expired and that had attempts left; now queued."""
    failed_lost: int = 0
    """Running rows whose lease expired on their last allowed attempt; now failed (lost)."""
    stale_queued: int = 0
    """Queued rows nobody claimed within ``queued_timeout_s`` (a message was probably lost)."""
    to_publish: list[tuple[RunSpec, int]] = field(default_factory=list)
    """``(spec, attempt)`` of requeued and stale queued runs, in plan order; ``attempt`` is
    the claims so far (what a publisher names the message after)."""

    @property
    def changed(self) -> bool:
        """Whether the pass did anything worth printing."""
        return bool(self.requeued or self.failed_lost or self.stale_queued)


@dataclass(frozen=True, slots=True)
class TakeBackReport:
    """What taking back the claims of dead owners changed (``take_back_orphans``)."""

    study_id: str
    owners: tuple[str, ...] = ()
    """The dead owners whose running rows were looked at."""
    released: int = 0
    """Claims that never started: back to ``queued``, their attempt refunded."""
    requeued: int = 0
    """Claims that started and had attempts left: back to ``queued``, charged as ``lost``."""
    failed_lost: int = 0
    """Claims that started on their last allowed attempt: now failed (lost)."""
    to_publish: list[tuple[RunSpec, int]] = field(default_factory=list)
    """``(spec, attempt)`` of the released and requeued runs, in plan order."""

    @property
    def changed(self) -> bool:
        """Whether anything was taken back."""
        return bool(self.released or self.requeued or self.failed_lost)


@dataclass(frozen=True, slots=True)
class StudyInfo:
    """A registered study as ``studyq status`` and ``studyq list`` show it."""

    study_id: str
    definition: dict[str, Any]
    definition_hash: str
    plan_fingerprint: str
    run_count: int
    condition_count: int
    max_attempts: int
    submitted_by: str
    submitted_at: datetime
    allowed_references: list[str]


@dataclass(frozen=True, slots=True)
class ConditionRecord:
    """One stored condition, in design order."""

    study_id: str
    position: int
    condition_id: str
    admissible: bool
    constraint_messages: list[Any]
    factor_assignments: dict[str, Any]
    block_assignments: dict[str, Any]
    metadata: dict[str, Any]
    """The condition's metadata (with its ``fingerprint``), the assignment_meta_json cell."""


@dataclass(frozen=True, slots=True)
class RunRecord(RunResultFields):
    """One stored run: its spec, lifecycle state and result (the declared
    :class:`~orchestrator.store.columns.RunResultFields`), as the exporter reads it."""

    @property
    def spec(self) -> RunSpec:
        """The run spec this row was registered from (``index`` is the plan index)."""
        return RunSpec(
            study_id=self.study_id,
            run_id=self.run_id,
            condition_id=self.condition_id,
            replicate=self.replicate,
            seed=self.seed,
            agent_id=self.agent_id,
            problem_id=self.problem_id,
            factor_assignments=dict(self.factor_assignments),
            block_assignments=dict(self.block_assignments),
            index=self.index,
            condition_fingerprint=self.condition_fingerprint,
        )


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One claim of one run and how it ended (``outcome`` is ``running`` while it runs)."""

    study_id: str
    index: int
    run_id: str
    attempt: int
    worker: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str
    error_kind: str | None
    error_type: str | None
    error_message: str | None


@dataclass(frozen=True, slots=True)
class EvaluationRecord(EvaluationFields):
    """One evaluations.csv row of a finished run; ``extra`` holds the producer's other keys
    in the order it wrote them."""

    extra: dict[str, Any]

    @property
    def row(self) -> dict[str, Any]:
        """The evaluations.csv row: ``run_id`` and the required columns, then the extras."""
        return EVALUATION_COLUMNS.csv_row(self)


@dataclass(frozen=True, slots=True)
class EventRecord(EventFields):
    """One events.csv row of a finished run; ``extra`` holds the producer's other keys
    (``level``, ``trial_id``, ...) in the order it wrote them."""

    extra: dict[str, Any]

    @property
    def row(self) -> dict[str, Any]:
        """The events.csv row: the required columns, then the extras in their order."""
        return EVENT_COLUMNS.csv_row(self)


@dataclass(frozen=True, slots=True)
class ProgressStats:
    """How fast a study is finishing runs and what it has cost, for ``studyq status``.

    Times come from the attempt history, stamped by the database clock, so workers with
    skewed clocks cannot distort the rate.
    """

    study_id: str
    cost_usd: float
    """Sum of ``cost_usd`` over the finished runs."""
    finished_recently: int
    """Attempts that ended in success or failure within the last ``window_s`` seconds."""
    window_s: float
    """The window the rate is measured over: the requested one, or less early in a sweep."""

    @property
    def recent_rate_per_s(self) -> float | None:
        """Runs finished per second over the window; None before anything finished."""
        if self.finished_recently <= 0 or self.window_s <= 0:
            return None
        return self.finished_recently / self.window_s


@dataclass(frozen=True, slots=True)
class ErrorSummary:
    """One group of failed runs for ``studyq status``: how many, one example message, and
    one run of the group (``studyq show`` prints its traceback)."""

    error_kind: str | None
    error_type: str | None
    count: int
    example: str | None
    example_run_id: str | None = None
