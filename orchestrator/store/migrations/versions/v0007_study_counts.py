"""A study's runs per status, kept as they change: a count no longer reads the study.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

Until now counting a study's runs per status (twice per reconcile tick of ``studyq wait``,
in ``studyq status``, ``watch`` and the dashboard) read ``ix_runs_not_succeeded``: the
runs a study has left, plus every index entry a vacuum has not reclaimed yet, and on
statistics older than the drain PostgreSQL chose a sequential scan of the whole table. At
1,000,000 runs a tick took 0.5 s with nothing done and 0.85 s with everything done
(docs/scaling.md). ``study_counts`` holds the count itself.

Triggers keep it, so every path that moves a run (registration, claims, results,
reconcile, cancel, resubmit) counts without knowing it:

* PostgreSQL: two statement-level ``AFTER`` triggers on ``runs`` (``INSERT``, ``UPDATE``;
  a heartbeat's update nets to no change and writes nothing). They read
  the statement's transition tables, so a 1,000,000-row ``COPY`` or a batch of results
  costs one aggregate, and add the net change per status to the row of the backend that
  made it (``shard = pg_backend_pid()``): two workers never wait on one counter, and no
  lock order between counters exists to deadlock on. The table has no foreign key (a key
  check would lock the ``studies`` row; ``ResultStore.delete_study`` deletes a study's
  counts). The function is ``SECURITY DEFINER``
  (owned by the coordinator once ``studyq_grant_roles()`` ran): the worker role has no
  right on ``study_counts`` and cannot forge a count. Every reconcile pass folds the rows
  of backends that have gone into shard 0 (:func:`orchestrator.store.counts.fold`).
* SQLite: row-level triggers (one writer) on shard 0.

``studyq_grant_roles()`` is replaced by one that also hands ``study_counts`` and the
trigger function to the coordinator and lets the analyst read the table. Existing studies
are counted once, after the triggers exist (their lock keeps writers out until commit).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from orchestrator.store.migrations.versions.v0005_budget_pause import (
    _FUNCTIONS as _FUNCTIONS_0005,
)
from orchestrator.store.migrations.versions.v0005_budget_pause import (
    _PAUSE_GRANTS,
    _grants_function,
)
from orchestrator.store.migrations.versions.v0005_budget_pause import (
    _TABLES as _TABLES_0005,
)

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = (*_TABLES_0005, "study_counts")
_FUNCTIONS = (*_FUNCTIONS_0005, "studyq_count_runs()")

_COUNT_FUNCTION = r"""
CREATE OR REPLACE FUNCTION public.studyq_count_runs() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $count$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO public.study_counts AS c (study_id, shard, status, n)
        SELECT r.study_id, pg_backend_pid(), r.status, count(*)
        FROM new_runs r
        GROUP BY r.study_id, r.status
        ORDER BY r.study_id, r.status
        ON CONFLICT (study_id, shard, status) DO UPDATE SET n = c.n + excluded.n;
    ELSE
        INSERT INTO public.study_counts AS c (study_id, shard, status, n)
        SELECT moved.study_id, pg_backend_pid(), moved.status, sum(moved.d)
        FROM (
            SELECT o.study_id, o.status, -1 AS d FROM old_runs o
            UNION ALL
            SELECT r.study_id, r.status, 1 FROM new_runs r
        ) AS moved
        GROUP BY moved.study_id, moved.status
        HAVING sum(moved.d) <> 0
        ORDER BY moved.study_id, moved.status
        ON CONFLICT (study_id, shard, status) DO UPDATE SET n = c.n + excluded.n;
    END IF;
    RETURN NULL;
END
$count$;
REVOKE ALL ON FUNCTION public.studyq_count_runs() FROM PUBLIC;
"""

_PG_TRIGGERS = (
    "CREATE TRIGGER studyq_count_runs_insert AFTER INSERT ON public.runs "
    "REFERENCING NEW TABLE AS new_runs "
    "FOR EACH STATEMENT EXECUTE FUNCTION public.studyq_count_runs()",
    # Not ``UPDATE OF status``: PostgreSQL allows no column list with transition tables. A
    # heartbeat's statement fires it too, and nets to nothing.
    "CREATE TRIGGER studyq_count_runs_update AFTER UPDATE ON public.runs "
    "REFERENCING OLD TABLE AS old_runs NEW TABLE AS new_runs "
    "FOR EACH STATEMENT EXECUTE FUNCTION public.studyq_count_runs()",
)

_SQLITE_TRIGGERS = (
    """
CREATE TRIGGER studyq_count_runs_insert AFTER INSERT ON runs BEGIN
    INSERT INTO study_counts (study_id, shard, status, n) VALUES (NEW.study_id, 0, NEW.status, 1)
    ON CONFLICT (study_id, shard, status) DO UPDATE SET n = n + 1;
END
""",
    """
CREATE TRIGGER studyq_count_runs_update AFTER UPDATE OF status ON runs
WHEN OLD.status IS NOT NEW.status BEGIN
    UPDATE study_counts SET n = n - 1
    WHERE study_id = OLD.study_id AND shard = 0 AND status = OLD.status;
    INSERT INTO study_counts (study_id, shard, status, n) VALUES (NEW.study_id, 0, NEW.status, 1)
    ON CONFLICT (study_id, shard, status) DO UPDATE SET n = n + 1;
END
""",
)

_TRIGGER_NAMES = ("studyq_count_runs_insert", "studyq_count_runs_update")

_BACKFILL = """
INSERT INTO study_counts (study_id, shard, status, n)
SELECT study_id, 0, status, count(*) FROM runs GROUP BY study_id, status
"""

# A deployment whose roles.sql predates revision 0003 (no studyq_role_name()): whoever may
# read runs may read the counts, as revision 0005 did for study_pauses.
_GRANT_LIKE_RUNS = """
DO $like_runs$
DECLARE
    grantee name;
BEGIN
    IF to_regprocedure('public.studyq_role_name(text)') IS NOT NULL THEN
        RETURN;
    END IF;
    FOR grantee IN
        SELECT DISTINCT g.grantee FROM information_schema.role_table_grants g
        WHERE g.table_schema = 'public' AND g.table_name = 'runs'
          AND g.privilege_type = 'SELECT' AND g.grantee <> 'PUBLIC'
          AND g.grantee <> g.grantor
    LOOP
        EXECUTE format('GRANT SELECT ON study_counts TO %I', grantee);
    END LOOP;
END
$like_runs$;
"""


def upgrade() -> None:
    op.create_table(
        "study_counts",
        sa.Column("study_id", sa.String(), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        # No foreign key to studies: its key check would have a worker's first count row
        # lock the studies row, which a deletion holds while it waits for the worker's run.
        # ResultStore.delete_study deletes a study's counts with it.
        sa.PrimaryKeyConstraint("study_id", "shard", "status", name=op.f("pk_study_counts")),
    )
    postgresql = op.get_bind().dialect.name == "postgresql"
    if postgresql:
        op.execute(_COUNT_FUNCTION)
    for trigger in _PG_TRIGGERS if postgresql else _SQLITE_TRIGGERS:
        op.execute(trigger)
    op.execute(_BACKFILL)
    if postgresql:
        op.execute(_grants_function(_TABLES, _PAUSE_GRANTS, _FUNCTIONS))
        op.execute("SELECT public.studyq_grant_roles()")
        op.execute(_GRANT_LIKE_RUNS)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for trigger in _TRIGGER_NAMES:
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (" ON public.runs" if postgresql else ""))
    if postgresql:
        op.execute(_grants_function(_TABLES_0005, _PAUSE_GRANTS))  # 0005's function again
        op.execute("DROP FUNCTION IF EXISTS public.studyq_count_runs()")
    op.drop_table("study_counts")
