"""The tables of the result store.

::

    studies 1──* conditions        (study_id, position)       the design, admissible or not
            1──* runs              (study_id, plan_index)     one row per run spec + its result
                     1──* run_attempts  (…, attempt)          every claim: worker, outcome, error
                     1──* evaluations   (…, seq)              written with the terminal result
                     1──* events        (…, seq)              written with the terminal result

Keys. The upstream planner does not de-duplicate: repeated level values give repeated
``condition_id`` and ``run_id`` values inside one study (UPSTREAM.md 6.4). So neither id can be
a key. A condition is keyed by its ``position`` in design order and a run by its
``plan_index`` (``RunSpec.index``, its position in plan order); ``run_id`` is indexed for
lookups and may repeat. Every child row carries ``(study_id, plan_index)`` and is deleted with
its run.

Attempts. ``attempt`` counts claims and never goes down: it is the fencing token that stops
a stale worker from overwriting a newer attempt. ``attempts_used`` is the budget checked
against ``max_attempts``: a claim charges it, a warm-shutdown release refunds it, a resubmit
resets it.

JSON. Values are JSONB on PostgreSQL, except where key order is data and plain ``json``
keeps it (see :data:`~orchestrator.store.sqltypes.OrderedJSONType`).

Indexes are chosen for a 1,000,000-run study: ``(study_id, status, plan_index)`` over the
runs that did not succeed serves the plan-order scans of one status (enqueue, cancel,
resubmit, lease expiry), so their cost follows what is left of a study, not what is done,
and ``(study_id, run_id)`` serves lookups by id (revision 0006). Progress counts read
``study_counts``, which triggers keep as runs change status (revision 0007).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy import (
    text as sql_text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, MappedColumn, mapped_column

from orchestrator.contracts.results import RunStatus
from orchestrator.store.columns import (
    EVALUATION_COLUMNS,
    EVENT_COLUMNS,
    RESULT_COLUMNS,
    ColumnSpec,
)
from orchestrator.store.sqltypes import JSONType, OrderedJSONType, UTCDateTime

__all__ = [
    "NOT_SUCCEEDED",
    "SPEC_COLUMNS",
    "AttemptOutcome",
    "AttemptRow",
    "Base",
    "ConditionRow",
    "EvaluationRow",
    "EventRow",
    "PauseRow",
    "RunRow",
    "StudyCountRow",
    "StudyRow",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with stable constraint names, so migrations can refer to them."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AttemptOutcome:
    """Values of ``run_attempts.outcome``: how one claim of a run ended."""

    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    LOST = "lost"  # the lease expired: the worker vanished or stopped heartbeating
    RELEASED = "released"  # warm shutdown handed the run back; not charged
    CANCELLED = "cancelled"


def _mapped(specs: Iterable[ColumnSpec]) -> dict[str, MappedColumn[Any]]:
    """Nullable columns for the declared ``specs``, to add to a model's class body in their
    order (``vars().update(...)``: the class namespace is the mapping being built)."""
    return {spec.name: mapped_column(spec.sql_type, nullable=True) for spec in specs}


_STATUSES = ", ".join(f"'{status.value}'" for status in RunStatus)

NOT_SUCCEEDED = f"status <> '{RunStatus.SUCCESS.value}'"
"""The predicate of ``ix_runs_not_succeeded``: a query that names it as literal SQL reads only
the runs a study has left, failed or cancelled, never its succeeded ones (v0006)."""


class StudyRow(Base):
    """One registered study: its canonical definition and what its plan produced."""

    __tablename__ = "studies"

    study_id: Mapped[str] = mapped_column(String, primary_key=True)
    definition: Mapped[dict[str, Any]] = mapped_column(OrderedJSONType)
    definition_hash: Mapped[str] = mapped_column(String)
    plan_fingerprint: Mapped[str] = mapped_column(String)
    run_count: Mapped[int] = mapped_column(Integer, default=0)
    condition_count: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    submitted_by: Mapped[str] = mapped_column(String, default="")
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    allowed_references: Mapped[list[str]] = mapped_column(JSONType)
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    """Set by ``studyq cancel``: no run of the study is claimed again (a resubmit clears it)."""
    budget_max_cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Set by ``studyq budget``: replaces the study file's ``execution.max_cost_usd``."""
    budget_max_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """Set by ``studyq budget``: replaces the study file's ``execution.max_tokens``."""
    resumed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    """Set by ``studyq resume``: the breaker then looks only at runs that ended after it."""


class PauseRow(Base):
    """A study whose dispatch is paused (a spent budget, a tripped breaker): while its row
    exists no run of the study is claimed. A table of its own, not columns of ``studies``:
    the worker that trips a pause may insert here, and still may not update (or lock) a
    ``studies`` row (deploy/postgres/roles.sql)."""

    __tablename__ = "study_pauses"

    study_id: Mapped[str] = mapped_column(
        String, ForeignKey("studies.study_id", ondelete="CASCADE"), primary_key=True
    )
    reason: Mapped[str] = mapped_column(String)  # 'budget' | 'breaker'
    paused_at: Mapped[datetime] = mapped_column(UTCDateTime)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONType)
    """What tripped it: spent and limits (budget), failed/window and the top error (breaker)."""


class StudyCountRow(Base):
    """How many of a study's runs are in each status, kept by triggers on ``runs`` (v0007),
    so a count costs a few rows however large the study is.

    On PostgreSQL every backend adds its own deltas to its own row (``shard`` is its
    ``pg_backend_pid()``): concurrent workers never wait on one another's counter, and a
    study's count is the sum of its rows. The rows of backends that have gone are folded
    into shard 0 before every reconcile pass (:func:`orchestrator.store.counts.fold`). SQLite
    has one writer and writes shard 0 only. Runs are only ever deleted with their study, and its
    counts with it.
    """

    __tablename__ = "study_counts"

    study_id: Mapped[str] = mapped_column(String, primary_key=True)
    """No foreign key: a worker's first count row would lock the ``studies`` row (a key
    check), which a study's deletion holds while it waits for the worker's run row.
    :meth:`~orchestrator.store.ResultStore.delete_study` deletes the counts itself."""
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class ConditionRow(Base):
    """One condition of the design, in design order (inadmissible ones included)."""

    __tablename__ = "conditions"
    __table_args__ = (Index(None, "study_id", "condition_id"),)

    study_id: Mapped[str] = mapped_column(
        String, ForeignKey("studies.study_id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    condition_id: Mapped[str] = mapped_column(String)
    admissible: Mapped[bool] = mapped_column(Boolean)
    constraint_messages: Mapped[list[Any]] = mapped_column(JSONType)
    factor_assignments: Mapped[dict[str, Any]] = mapped_column(OrderedJSONType)
    block_assignments: Mapped[dict[str, Any]] = mapped_column(OrderedJSONType)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", OrderedJSONType)


class RunRow(Base):
    """One run: its spec (immutable), its lifecycle state, and its terminal result (the
    declared result columns; name them in SQL as ``RunRow.__table__.c.<name>``)."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="status"),
        Index(
            "ix_runs_not_succeeded",  # one-status scans of what is left (v0006)
            "study_id",
            "status",
            "plan_index",
            postgresql_where=sql_text(NOT_SUCCEEDED),
            sqlite_where=sql_text(NOT_SUCCEEDED),
        ),
        Index(None, "study_id", "run_id"),
        Index(
            "ix_runs_ended",  # a breaker's latest finished runs (v0005, partial since v0006)
            "study_id",
            "ended_at",
            postgresql_where=sql_text("ended_at IS NOT NULL"),
            sqlite_where=sql_text("ended_at IS NOT NULL"),
        ),
        Index(
            "ix_runs_running_lease",
            "study_id",
            "lease_expires_at",
            postgresql_where=sql_text("status = 'running'"),
            sqlite_where=sql_text("status = 'running'"),
        ),
    )

    # -- the spec ------------------------------------------------------------------------
    study_id: Mapped[str] = mapped_column(
        String, ForeignKey("studies.study_id", ondelete="CASCADE"), primary_key=True
    )
    plan_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String)
    condition_id: Mapped[str] = mapped_column(String)
    replicate: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    agent_id: Mapped[Any] = mapped_column(JSONType, nullable=True)  # raw value (may be an int)
    problem_id: Mapped[Any] = mapped_column(JSONType, nullable=True)
    agent_key: Mapped[str] = mapped_column(String)  # text form, for grouping and filters
    problem_key: Mapped[str] = mapped_column(String)
    factor_assignments: Mapped[dict[str, Any]] = mapped_column(OrderedJSONType)
    block_assignments: Mapped[dict[str, Any]] = mapped_column(OrderedJSONType)
    condition_fingerprint: Mapped[str] = mapped_column(String)
    spec_digest: Mapped[str] = mapped_column(String)  # RunSpec.digest(); workers verify it

    # -- the lifecycle -------------------------------------------------------------------
    status: Mapped[str] = mapped_column(String)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    attempts_used: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    lease_owner: Mapped[str | None] = mapped_column(String, nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    # -- the result: one column per declared field (columns.RESULT_COLUMNS) ---------------
    vars().update(_mapped(RESULT_COLUMNS))


SPEC_COLUMNS = (
    RunRow.plan_index,
    RunRow.run_id,
    RunRow.condition_id,
    RunRow.replicate,
    RunRow.seed,
    RunRow.agent_id,
    RunRow.problem_id,
    RunRow.factor_assignments,
    RunRow.block_assignments,
    RunRow.condition_fingerprint,
)
"""The columns of ``runs`` that hold the spec; select them to rebuild a RunSpec with
:func:`~orchestrator.store.records.spec_from_row`."""

_RUN_FK = ("study_id", "plan_index")
_RUN_REF = ("runs.study_id", "runs.plan_index")


class AttemptRow(Base):
    """One claim of a run, from claim to its end; analysts read retries from here."""

    __tablename__ = "run_attempts"
    __table_args__ = (ForeignKeyConstraint(_RUN_FK, _RUN_REF, ondelete="CASCADE"),)

    study_id: Mapped[str] = mapped_column(String, primary_key=True)
    plan_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String)
    worker: Mapped[str] = mapped_column(String)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    outcome: Mapped[str] = mapped_column(String)
    error_kind: Mapped[str | None] = mapped_column(String, nullable=True)
    error_type: Mapped[str | None] = mapped_column(String, nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)


class EvaluationRow(Base):
    """One evaluations.csv row of a run's terminal attempt (``seq`` keeps their order)."""

    __tablename__ = "evaluations"
    __table_args__ = (ForeignKeyConstraint(_RUN_FK, _RUN_REF, ondelete="CASCADE"),)

    study_id: Mapped[str] = mapped_column(String, primary_key=True)
    plan_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String)
    attempt: Mapped[int] = mapped_column(Integer)
    vars().update(_mapped(EVALUATION_COLUMNS.columns))
    extra: Mapped[dict[str, Any]] = mapped_column(OrderedJSONType)


class EventRow(Base):
    """One events.csv row of a run's terminal attempt (``seq`` keeps their order)."""

    __tablename__ = "events"
    __table_args__ = (ForeignKeyConstraint(_RUN_FK, _RUN_REF, ondelete="CASCADE"),)

    study_id: Mapped[str] = mapped_column(String, primary_key=True)
    plan_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String)
    attempt: Mapped[int] = mapped_column(Integer)
    vars().update(_mapped(EVENT_COLUMNS.columns))
    extra: Mapped[dict[str, Any]] = mapped_column(OrderedJSONType)
