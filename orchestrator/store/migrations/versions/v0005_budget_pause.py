"""Budgets and the failure breaker: a study's dispatch can be paused, and its budget raised.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

``study_pauses`` holds one row per paused study (``reason`` 'budget' or 'breaker', what
tripped it in ``detail``); while it exists no run of the study is claimed. It is a table of
its own rather than columns of ``studies`` because the worker that trips a pause must be
able to write it, and the worker role may not update, or lock, a ``studies`` row
(deploy/postgres/roles.sql; ``schema._grant_roles`` grants it SELECT, INSERT here).

``studies.budget_max_cost_usd`` / ``budget_max_tokens`` are what ``studyq budget`` set
(null: the study file's ``execution.max_cost_usd`` / ``max_tokens``); ``resumed_at`` is
when ``studyq resume`` last cleared a pause (the breaker looks only at runs that ended
after it). The index on
``runs (study_id, ended_at)`` serves the breaker's "latest ``window`` finished runs".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.add_column("studies", sa.Column("budget_max_cost_usd", sa.Float(), nullable=True))
    op.add_column("studies", sa.Column("budget_max_tokens", sa.BigInteger(), nullable=True))
    op.add_column("studies", sa.Column("resumed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "study_pauses",
        sa.Column("study_id", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", _json(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.study_id"],
            name=op.f("fk_study_pauses_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_study_pauses")),
    )
    op.create_index(op.f("ix_runs_study_id_ended_at"), "runs", ["study_id", "ended_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_runs_study_id_ended_at"), table_name="runs")
    op.drop_table("study_pauses")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("resumed_at")
        batch.drop_column("budget_max_tokens")
        batch.drop_column("budget_max_cost_usd")
