"""The where_* helpers: which rows of ``runs`` a transition or a filter may touch.

Transitions are guarded by these clauses, so a transition can only win from the state its
clause names. :data:`FENCE` is the guard of everything a worker does with a claim.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, literal_column, or_
from sqlalchemy import text as sql_text

from orchestrator.contracts.canonical import to_jsonable
from orchestrator.contracts.results import RunStatus
from orchestrator.store.models import NOT_SUCCEEDED, RunRow
from orchestrator.store.records import Claim
from orchestrator.store.sqltypes import db_now, json_field_equals

__all__ = [
    "FENCE",
    "IN_CHUNK",
    "fence_params",
    "in_chunks",
    "index_in",
    "where_filters",
    "where_lease_expired",
    "where_run",
    "where_status",
]

IN_CHUNK = 1_000
"""Keys per ``IN (...)`` list, well under SQLite's bound-parameter limit."""


def where_run(study_id: str, index: int) -> ColumnElement[bool]:
    """The one run at ``index`` in the plan of ``study_id``."""
    return and_(RunRow.study_id == study_id, RunRow.plan_index == index)


def where_status(*statuses: RunStatus) -> ColumnElement[bool]:
    """Runs in one of ``statuses``. Unless success is among them, the clause also names the
    predicate of ``ix_runs_not_succeeded`` as literal SQL, so that index serves the query on
    SQLite and in PostgreSQL's generic plans too (neither can match a partial index from a
    bound ``status = $1``): the scan reads what the study has left, not every run. The
    statuses are rendered as literals for the same reason (they are the enum's own values),
    which lets ``status = 'running'`` match ``ix_runs_running_lease`` as well."""
    values: list[ColumnElement[Any]] = [
        literal_column(f"'{RunStatus(status).value}'") for status in statuses
    ]
    wanted = RunRow.status == values[0] if len(values) == 1 else RunRow.status.in_(values)
    if RunStatus.SUCCESS in statuses:
        return wanted
    return and_(wanted, sql_text(NOT_SUCCEEDED))


def where_lease_expired(study_id: str) -> ColumnElement[bool]:
    """Running rows of a study whose lease ran out by the database clock.

    The status is rendered as a SQL literal, not a bound parameter, so PostgreSQL can match
    the partial index ``ix_runs_running_lease`` even in a generic (prepared) plan.
    """
    return and_(
        RunRow.study_id == study_id,
        RunRow.status == literal_column(f"'{RunStatus.RUNNING.value}'"),
        RunRow.lease_expires_at < db_now(),
    )


FENCE = and_(
    RunRow.study_id == bindparam("f_study"),
    RunRow.plan_index == bindparam("f_index"),
    RunRow.status == RunStatus.RUNNING.value,
    RunRow.attempt == bindparam("f_attempt"),
    RunRow.lease_owner == bindparam("f_worker"),
)
"""The fence: the claim's run, only while that worker still holds that attempt. Bound per
call by :func:`_fence_params`."""

FINISH_FENCE = or_(
    FENCE,
    and_(
        RunRow.study_id == bindparam("f_study"),
        RunRow.plan_index == bindparam("f_index"),
        RunRow.status == RunStatus.QUEUED.value,
        RunRow.attempt == bindparam("f_attempt"),
        RunRow.lease_owner.is_(None),
    ),
)
"""The fence for results: also a run the reconcile loop sent back to the queue because this
attempt's lease expired (a database outage outlasted the lease, so no heartbeat got through),
as long as nobody claimed it since: the attempt number is unchanged. Accepting that late
result is what keeps an outage from running the agent twice; the republished message then
finds the run finished and is acknowledged as a duplicate."""


def fence_params(claim: Claim) -> dict[str, Any]:
    return {
        "f_study": claim.study_id,
        "f_index": claim.index,
        "f_attempt": claim.attempt,
        "f_worker": claim.worker,
    }


_FILTER_COLUMNS: dict[str, Any] = {
    "run_id": RunRow.run_id,
    "condition_id": RunRow.condition_id,
    "condition": RunRow.condition_id,
    "agent_id": RunRow.agent_key,
    "agent": RunRow.agent_key,
    "problem_id": RunRow.problem_key,
    "problem": RunRow.problem_key,
    "replicate": RunRow.replicate,
    "index": RunRow.plan_index,
    "error_kind": RunRow.__table__.c.error_kind,
    "error_type": RunRow.__table__.c.error_type,
}


def where_filters(where: Mapping[str, Any] | None) -> list[ColumnElement[bool]]:
    """Clauses for ``studyq resubmit``-style filters.

    Keys ``run_id``, ``condition_id``/``condition``, ``agent_id``/``agent``,
    ``problem_id``/``problem`` (compared as text), ``replicate``, ``index``, ``error_kind``,
    ``error_type`` match those columns; any other key names a factor and matches its level
    as a JSON value (``0.7`` and ``"0.7"`` are different levels). A list, tuple or set value
    matches any of its items.
    """
    clauses: list[ColumnElement[bool]] = []
    for key, value in (where or {}).items():
        values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
        column = _FILTER_COLUMNS.get(key)
        if column is not None:
            if column in (RunRow.agent_key, RunRow.problem_key):
                values = [str(item) for item in values]
            clauses.append(column.in_(values))
        else:
            field = RunRow.factor_assignments
            clauses.append(or_(*(json_field_equals(field, key, to_jsonable(v)) for v in values)))
    return clauses


def index_in(chunk: Sequence[int]) -> ColumnElement[bool]:
    """``runs.plan_index`` among ``chunk`` (one of :func:`in_chunks`): a range when the
    chunk is a run of consecutive indices in order (what a submit's pages are), which binds
    two parameters instead of one per index; at 1,000 a page the driver parsing and the
    compiler rendering the ``IN`` list took a third of the marking thread's time."""
    first = chunk[0] if chunk else 0
    if (
        chunk
        and chunk[-1] - first == len(chunk) - 1
        and list(chunk) == list(range(first, first + len(chunk)))
    ):
        return RunRow.plan_index.between(first, chunk[-1])
    return RunRow.plan_index.in_(chunk)


def in_chunks(indices: Sequence[int]) -> Iterable[Sequence[int]]:
    for start in range(0, len(indices), IN_CHUNK):
        yield indices[start : start + IN_CHUNK]
