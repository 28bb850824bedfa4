"""A study's runs per status, read from ``study_counts`` (revision 0007).

Triggers on ``runs`` keep the table as runs change status, in the transaction that changes
them, so a count is exact in every snapshot and costs a few rows whatever the study's size:
a reconcile tick of a 1,000,000-run study reads the same handful of rows as one of ten runs.

On PostgreSQL each backend writes its own row per status (``shard = pg_backend_pid()``), so
the rows of a long study accumulate one set per backend that ever touched it. :func:`fold`
moves the rows of backends that have gone into shard 0; every reconcile pass calls it (in a
short transaction of its own, before the pass), so what a count reads stays bounded by the
backends alive now.
"""

from __future__ import annotations

from sqlalchemy import delete, func, select, text
from sqlalchemy.engine import Connection

from orchestrator.contracts.results import RunStatus
from orchestrator.store.models import StudyCountRow

__all__ = ["count_by_status", "delete_counts", "fold", "lock_out_folds"]

_FOLD_KEY = "studyq.fold"
"""Namespace of the advisory lock that makes one fold at a time per study, and a study's
deletion wait for it (:func:`lock_out_folds`)."""

_LOCK = "(hashtext(:namespace), hashtext(:study_id))"

_FOLD_PG = text(
    """
WITH doomed AS (
    SELECT c.shard, c.status FROM study_counts c
    WHERE c.study_id = :study_id AND c.shard <> 0
      AND c.shard NOT IN (SELECT a.pid FROM pg_stat_activity a WHERE a.pid IS NOT NULL)
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM study_counts c USING doomed d
    WHERE c.study_id = :study_id AND c.shard = d.shard AND c.status = d.status
    RETURNING c.status, c.n
)
INSERT INTO study_counts AS c (study_id, shard, status, n)
SELECT :study_id, 0, gone.status, sum(gone.n) FROM gone
GROUP BY gone.status
ON CONFLICT (study_id, shard, status) DO UPDATE SET n = c.n + excluded.n
"""
)
"""A fold never waits. A backend that has gone holds no lock on its rows; a row some live
transaction holds (a new backend reusing a pid) is skipped for a later fold; shard 0 is
written only under the fold's advisory lock. Nothing is lost either way: a row is moved
with whatever it holds when the fold takes it."""


def count_by_status(connection: Connection, study_id: str) -> dict[str, int]:
    """Runs per status, every status present (zero when none)."""
    counts = {status.value: 0 for status in RunStatus}
    rows = connection.execute(
        select(StudyCountRow.status, func.sum(StudyCountRow.n))
        .where(StudyCountRow.study_id == study_id)
        .group_by(StudyCountRow.status)
    )
    for status, n in rows:
        counts[status] = int(n)
    return counts


def fold(connection: Connection, study_id: str) -> bool:
    """Fold the count rows of ``study_id`` written by backends that have gone into shard 0
    (PostgreSQL; SQLite writes shard 0 only). False when another fold of the study holds
    the lock: it does the same work. Run it in a transaction of its own: its row locks last
    until that commits."""
    if connection.dialect.name != "postgresql":
        return False
    lock = {"namespace": _FOLD_KEY, "study_id": study_id}
    if not connection.execute(text(f"SELECT pg_try_advisory_xact_lock{_LOCK}"), lock).scalar():
        return False
    connection.execute(_FOLD_PG, {"study_id": study_id})
    return True


def lock_out_folds(connection: Connection, study_id: str) -> None:
    """Wait for a running fold of ``study_id`` and keep new ones out until this transaction
    ends (a study's deletion: a fold committing after it could leave a shard-0 row behind
    for a study of the same id registered later)."""
    if connection.dialect.name == "postgresql":
        lock = {"namespace": _FOLD_KEY, "study_id": study_id}
        connection.execute(text(f"SELECT pg_advisory_xact_lock{_LOCK}"), lock)


def delete_counts(connection: Connection, study_id: str) -> None:
    """Delete the study's count rows (with the study: the table has no foreign key, so a
    worker's first count row never locks the ``studies`` row a deletion holds)."""
    connection.execute(delete(StudyCountRow).where(StudyCountRow.study_id == study_id))
