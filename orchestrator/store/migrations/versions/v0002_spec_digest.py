"""Each run keeps the digest of its registered spec, so a worker can verify a message.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06

A worker claims a run only when the digest of the message it received equals
``runs.spec_digest`` (see ``orchestrator.contracts.runspec.spec_digest``): a message whose seed,
assignments, agent, problem or ids were changed on the broker claims nothing. Runs registered
before this revision get the digest of their stored spec, computed here the way the
publisher builds its messages from the stored columns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 5_000


def _digest(study_id: str, row: Any) -> str:
    # Frozen copy of RunSpec.to_message() + spec_digest() as of this revision, so the
    # migration keeps computing the same digests whatever later code says.
    message = {
        "study_id": study_id,
        "run_id": row.run_id,
        "condition_id": row.condition_id,
        "replicate": row.replicate,
        "seed": row.seed,
        "agent_id": row.agent_id,
        "problem_id": row.problem_id,
        "factor_assignments": row.factor_assignments,
        "block_assignments": row.block_assignments,
        "index": row.plan_index,
        "condition_fingerprint": row.condition_fingerprint,
    }
    text = json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def upgrade() -> None:
    op.add_column("runs", sa.Column("spec_digest", sa.String(), nullable=True))
    connection = op.get_bind()
    runs = sa.table(
        "runs",
        sa.column("study_id", sa.String()),
        sa.column("plan_index", sa.Integer()),
        sa.column("run_id", sa.String()),
        sa.column("condition_id", sa.String()),
        sa.column("replicate", sa.Integer()),
        sa.column("seed", sa.BigInteger()),
        sa.column("agent_id", sa.JSON()),
        sa.column("problem_id", sa.JSON()),
        sa.column("factor_assignments", sa.JSON()),
        sa.column("block_assignments", sa.JSON()),
        sa.column("condition_fingerprint", sa.String()),
        sa.column("spec_digest", sa.String()),
    )
    update = (
        sa.update(runs)
        .where(
            runs.c.study_id == sa.bindparam("b_study"),
            runs.c.plan_index == sa.bindparam("b_index"),
        )
        .values(spec_digest=sa.bindparam("b_digest"))
    )
    while True:
        rows = connection.execute(
            sa.select(runs).where(runs.c.spec_digest.is_(None)).limit(_BATCH)
        ).all()
        if not rows:
            break
        connection.execute(
            update,
            [
                {
                    "b_study": row.study_id,
                    "b_index": row.plan_index,
                    "b_digest": _digest(row.study_id, row),
                }
                for row in rows
            ],
        )
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("spec_digest", existing_type=sa.String(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("spec_digest")
