"""Coordinator passes on PostgreSQL never wait on a row a worker holds locked.

A worker frozen (SIGSTOP, a paused VM, a network partition) between its ``UPDATE`` and its
``COMMIT`` keeps its run's row lock for as long as the server keeps its session, hours with
default TCP keepalives. The coordinator's passes (reconcile, take-back, cancel) therefore
change only rows they can lock at once (:func:`where_unlocked`, ``FOR UPDATE SKIP LOCKED``)
and bound every other lock wait of their transaction (:func:`bound_lock_waits`). SQLite has
no row locks and a single writer, so there both are no-ops.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, and_, select
from sqlalchemy.engine import Connection

from orchestrator.store.models import RunRow

__all__ = ["RECONCILE_LOCK_TIMEOUT_MS", "bound_lock_waits", "where_unlocked"]

RECONCILE_LOCK_TIMEOUT_MS = 5_000
"""Longest a reconcile statement waits for a lock on PostgreSQL (``SET LOCAL lock_timeout``).

Row locks held by workers are skipped, not waited for, so only an unexpected lock (a schema
migration, a manual ``LOCK TABLE``) can reach this; the pass then fails with
:class:`~orchestrator.contracts.errors.StoreUnavailableError` and ``studyq wait`` retries it on the
next pass instead of hanging."""


def bound_lock_waits(connection: Connection, timeout_ms: int | None = None) -> None:
    """Make any lock wait of the rest of this transaction fail after
    ``timeout_ms`` (default :data:`RECONCILE_LOCK_TIMEOUT_MS`) instead of blocking
    (PostgreSQL only)."""
    if connection.dialect.name == "postgresql":
        timeout = RECONCILE_LOCK_TIMEOUT_MS if timeout_ms is None else timeout_ms
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(timeout)}")


def where_unlocked(
    connection: Connection, study_id: str, clause: ColumnElement[bool]
) -> ColumnElement[bool]:
    """``clause`` narrowed to the study's rows that no other transaction holds locked.

    On PostgreSQL the matching rows are locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` in a
    subquery, so the ``UPDATE`` using this clause changes exactly those rows and never waits
    on a row a (possibly frozen) worker locked; a skipped row is judged again on a later pass.
    SQLite has no row locks (one writer holds the database), so there ``clause`` is returned
    as it is.
    """
    where = and_(RunRow.study_id == study_id, clause)
    if connection.dialect.name != "postgresql":
        return where
    free = select(RunRow.plan_index).where(where).correlate(None).with_for_update(skip_locked=True)
    return and_(where, RunRow.plan_index.in_(free))
