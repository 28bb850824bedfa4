"""A study's runs per status, read from ``study_counts`` (revision 0007).

Triggers on ``runs`` keep the table as runs change status, in the transaction that changes
them, so a count is exact in every snapshot and costs a few rows whatever the study's size:
a reconcile tick of a 1,000,000-run study reads the same handful of rows as one of ten runs.

On PostgreSQL each backend writes its own row per status (``shard = pg_backend_pid()``), so
the rows of a long study accumulate one set per backend that ever touched it. :func:`fold`
moves the rows of backends that have gone into shard 0; the reconcile tick calls it, so
what a count reads stays bounded by the backends alive now.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection

from orchestrator.contracts.results import RunStatus
from orchestrator.store.models import StudyCountRow

__all__ = ["count_by_status", "fold"]

_FOLD_PG = text(
    """
WITH gone AS (
    DELETE FROM study_counts c
    WHERE c.study_id = :study_id AND c.shard <> 0
      AND c.shard NOT IN (SELECT a.pid FROM pg_stat_activity a WHERE a.pid IS NOT NULL)
    RETURNING c.status, c.n
)
INSERT INTO study_counts AS c (study_id, shard, status, n)
SELECT :study_id, 0, gone.status, sum(gone.n) FROM gone
GROUP BY gone.status
ORDER BY gone.status
ON CONFLICT (study_id, shard, status) DO UPDATE SET n = c.n + excluded.n
"""
)
"""Folding never waits on a worker: a backend that has gone holds no lock on its rows. If a
new backend reuses a pid between the activity read and the delete, its row is folded with
whatever it holds then (the delete sees the row's latest version): nothing is lost either
way. Concurrent folds meet only on shard 0, in status order."""


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


def fold(connection: Connection, study_id: str) -> None:
    """Fold the count rows of ``study_id`` written by backends that have gone into shard 0
    (PostgreSQL; SQLite writes shard 0 only). Part of the caller's transaction."""
    if connection.dialect.name == "postgresql":
        connection.execute(_FOLD_PG, {"study_id": study_id})
