"""The initial result-store schema: studies, conditions, runs, attempts, evaluations, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-29

Types are spelled out here rather than imported from ``models`` so this revision keeps
creating the same schema whatever later versions of the models say.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ordered_json() -> sa.types.TypeEngine[Any]:
    return sa.JSON()  # plain json on PostgreSQL: keeps key order (see models)


def _timestamp() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _run_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["study_id", "plan_index"],
        ["runs.study_id", "runs.plan_index"],
        name=op.f(f"fk_{table}_runs"),
        ondelete="CASCADE",
    )


_RUNNING = sa.text("status = 'running'")


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("study_id", sa.String(), nullable=False),
        sa.Column("definition", _ordered_json(), nullable=False),
        sa.Column("definition_hash", sa.String(), nullable=False),
        sa.Column("plan_fingerprint", sa.String(), nullable=False),
        sa.Column("run_count", sa.Integer(), nullable=False),
        sa.Column("condition_count", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("submitted_by", sa.String(), nullable=False),
        sa.Column("submitted_at", _timestamp(), nullable=False),
        sa.Column("allowed_references", _json(), nullable=False),
        sa.PrimaryKeyConstraint("study_id", name=op.f("pk_studies")),
    )
    op.create_table(
        "conditions",
        sa.Column("study_id", sa.String(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("condition_id", sa.String(), nullable=False),
        sa.Column("admissible", sa.Boolean(), nullable=False),
        sa.Column("constraint_messages", _json(), nullable=False),
        sa.Column("factor_assignments", _ordered_json(), nullable=False),
        sa.Column("block_assignments", _ordered_json(), nullable=False),
        sa.Column("metadata", _ordered_json(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.study_id"],
            name=op.f("fk_conditions_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("study_id", "position", name=op.f("pk_conditions")),
    )
    op.create_index(
        op.f("ix_conditions_study_id_condition_id"), "conditions", ["study_id", "condition_id"]
    )
    op.create_table(
        "runs",
        sa.Column("study_id", sa.String(), nullable=False),
        sa.Column("plan_index", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("condition_id", sa.String(), nullable=False),
        sa.Column("replicate", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("agent_id", _json(), nullable=True),
        sa.Column("problem_id", _json(), nullable=True),
        sa.Column("agent_key", sa.String(), nullable=False),
        sa.Column("problem_key", sa.String(), nullable=False),
        sa.Column("factor_assignments", _ordered_json(), nullable=False),
        sa.Column("block_assignments", _ordered_json(), nullable=False),
        sa.Column("condition_fingerprint", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("attempts_used", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(), nullable=True),
        sa.Column("lease_expires_at", _timestamp(), nullable=True),
        sa.Column("queued_at", _timestamp(), nullable=True),
        sa.Column("started_at", _timestamp(), nullable=True),
        sa.Column("ended_at", _timestamp(), nullable=True),
        sa.Column("outputs", _json(), nullable=True),
        sa.Column("metrics", _json(), nullable=True),
        sa.Column("latency_s", sa.Float(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), nullable=True),
        sa.Column("output_tokens", sa.BigInteger(), nullable=True),
        sa.Column("primary_outcome", _json(), nullable=True),
        sa.Column("trace_refs", _json(), nullable=True),
        sa.Column("provenance", _json(), nullable=True),
        sa.Column("error_kind", sa.String(), nullable=True),
        sa.Column("error_type", sa.String(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('planned', 'queued', 'running', 'success', 'failed', 'cancelled')",
            name=op.f("ck_runs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.study_id"], name=op.f("fk_runs_studies"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("study_id", "plan_index", name=op.f("pk_runs")),
    )
    op.create_index(
        op.f("ix_runs_study_id_status_plan_index"), "runs", ["study_id", "status", "plan_index"]
    )
    op.create_index(op.f("ix_runs_study_id_run_id"), "runs", ["study_id", "run_id"])
    op.create_index(
        "ix_runs_running_lease",
        "runs",
        ["study_id", "lease_expires_at"],
        postgresql_where=_RUNNING,
        sqlite_where=_RUNNING,
    )
    op.create_table(
        "run_attempts",
        sa.Column("study_id", sa.String(), nullable=False),
        sa.Column("plan_index", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("worker", sa.String(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=False),
        sa.Column("ended_at", _timestamp(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("error_kind", sa.String(), nullable=True),
        sa.Column("error_type", sa.String(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        _run_fk("run_attempts"),
        sa.PrimaryKeyConstraint("study_id", "plan_index", "attempt", name=op.f("pk_run_attempts")),
    )
    op.create_table(
        "evaluations",
        sa.Column("study_id", sa.String(), nullable=False),
        sa.Column("plan_index", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("evaluator_id", sa.String(), nullable=True),
        sa.Column("metric_name", sa.String(), nullable=True),
        sa.Column("metric_value", _json(), nullable=True),
        sa.Column("metric_unit", sa.String(), nullable=True),
        sa.Column("aggregation_level", sa.String(), nullable=True),
        sa.Column("notes_json", _json(), nullable=True),
        sa.Column("extra", _ordered_json(), nullable=False),
        _run_fk("evaluations"),
        sa.PrimaryKeyConstraint("study_id", "plan_index", "seq", name=op.f("pk_evaluations")),
    )
    op.create_table(
        "events",
        sa.Column("study_id", sa.String(), nullable=False),
        sa.Column("plan_index", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("timestamp", sa.Text(), nullable=True),
        sa.Column("record_id", sa.Text(), nullable=True),
        sa.Column("text", sa.Text(), nullable=True),
        sa.Column("session_id", sa.Text(), nullable=True),
        sa.Column("actor_id", sa.Text(), nullable=True),
        sa.Column("event_type", sa.Text(), nullable=True),
        sa.Column("meta_json", _json(), nullable=True),
        sa.Column("extra", _ordered_json(), nullable=False),
        _run_fk("events"),
        sa.PrimaryKeyConstraint("study_id", "plan_index", "seq", name=op.f("pk_events")),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("evaluations")
    op.drop_table("run_attempts")
    op.drop_index("ix_runs_running_lease", table_name="runs")
    op.drop_index(op.f("ix_runs_study_id_run_id"), table_name="runs")
    op.drop_index(op.f("ix_runs_study_id_status_plan_index"), table_name="runs")
    op.drop_table("runs")
    op.drop_index(op.f("ix_conditions_study_id_condition_id"), table_name="conditions")
    op.drop_table("conditions")
    op.drop_table("studies")
