"""A study remembers that it was cancelled, so runs left running by a cancel never run again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

``studyq cancel`` without ``--terminate`` lets executing runs finish. If such a run's worker
then dies or hands it back, the run returns to ``queued``; ``studies.cancelled_at`` makes the
worker's claim refuse it and the reconcile loop cancel it instead of publishing it again. A
resubmit clears it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("studies", sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("cancelled_at")
