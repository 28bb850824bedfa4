"""Indexes that leave succeeded runs out: a reconcile tick costs what is left, not what is done.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07

Until now ``runs (study_id, status, plan_index)`` held an entry for every run, so counting a
study's runs per status (twice per reconcile tick of ``studyq wait``, and in ``studyq
status``) read every entry of the study, finished or not: at 1,000,000 runs that is a
million index entries per count, however few runs are left. Revision 0006 replaces it with
the same index restricted to ``status <> 'success'``: the runs still waiting, running,
failed or cancelled. Counting reads those and takes the succeeded count from
``studies.run_count`` (:func:`orchestrator.store.queries.count_by_status`); the plan-order
scans of one status (publish planned runs, re-publish stale queued ones, cancel, resubmit
failed) read the same index. A scan of succeeded runs (export) reads the primary key in
plan order, which it did in practice already.

The breaker's ``runs (study_id, ended_at)`` (revision 0005) gets ``WHERE ended_at IS NOT
NULL``: a claim (which leaves ``ended_at`` null) then adds no entry to it.

Why not HOT updates. PostgreSQL updates a row in place (HOT, no new index entries) only when
no indexed column changes, including the columns of a partial index's predicate. Every
claim and every result changes ``status``, so any index that names ``status`` (which the
tick needs to find expired leases and stale queued runs without reading the study) makes
both updates non-HOT. What this revision changes is how many index entries each update adds:
a result now adds entries to the primary key, ``(study_id, run_id)`` and the ended-at index
only; a claim adds none to the ended-at index. docs/scaling.md has the measurements.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NOT_SUCCEEDED = sa.text("status <> 'success'")
_ENDED = sa.text("ended_at IS NOT NULL")


def upgrade() -> None:
    op.drop_index(op.f("ix_runs_study_id_status_plan_index"), table_name="runs")
    op.create_index(
        "ix_runs_not_succeeded",
        "runs",
        ["study_id", "status", "plan_index"],
        postgresql_where=_NOT_SUCCEEDED,
        sqlite_where=_NOT_SUCCEEDED,
    )
    op.drop_index(op.f("ix_runs_study_id_ended_at"), table_name="runs")
    op.create_index(
        "ix_runs_ended",
        "runs",
        ["study_id", "ended_at"],
        postgresql_where=_ENDED,
        sqlite_where=_ENDED,
    )


def downgrade() -> None:
    op.drop_index("ix_runs_ended", table_name="runs")
    op.create_index(op.f("ix_runs_study_id_ended_at"), "runs", ["study_id", "ended_at"])
    op.drop_index("ix_runs_not_succeeded", table_name="runs")
    op.create_index(
        op.f("ix_runs_study_id_status_plan_index"), "runs", ["study_id", "status", "plan_index"]
    )
