"""Budgets and the failure breaker: a study's dispatch can be paused, and its budget raised.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

``study_pauses`` holds one row per paused study (``reason`` 'budget' or 'breaker', what
tripped it in ``detail``); while it exists no run of the study is claimed. It is a table of
its own rather than columns of ``studies`` because the worker that trips a pause must be
able to write it, and the worker role may not update, or lock, a ``studies`` row
(deploy/postgres/roles.sql; ``schema._grant_roles`` grants it SELECT, INSERT here).

On PostgreSQL it replaces ``studyq_grant_roles()`` (revision 0003) with one that also hands
``study_pauses`` to the coordinator and grants it: the worker SELECT (every claim tests for a
pause) and INSERT (it trips one), never UPDATE or DELETE (only the coordinator resumes); the
analyst SELECT. roles.sql calls the function too, so either order leaves these rights.

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


# -- studyq_grant_roles(), frozen as of this revision (0003's, plus study_pauses) ----------

_TABLES_0003 = (
    "studies",
    "conditions",
    "runs",
    "run_attempts",
    "evaluations",
    "events",
    "studyq_alembic_version",
)
_TABLES = (*_TABLES_0003, "study_pauses")
_VIEWS = ("analysis_runs", "analysis_evaluations", "analysis_attempts")
_FUNCTIONS = (
    "studyq_guard_run_update()",
    "studyq_guard_attempt_update()",
    "studyq_guard_result_insert()",
    "studyq_guard_attempt_insert()",
    "studyq_grant_roles()",
)
_RUN_COLUMNS_WORKERS_WRITE = (
    "status, attempt, attempts_used, lease_owner, lease_expires_at, queued_at, started_at, "
    "ended_at, outputs, metrics, latency_s, cost_usd, input_tokens, output_tokens, "
    "primary_outcome, trace_refs, provenance, error_kind, error_type, error_message, traceback"
)
_PAUSE_GRANTS = """
    EXECUTE format('GRANT SELECT, INSERT ON study_pauses TO %I', worker);
"""


def _array(names: Sequence[str]) -> str:
    return "ARRAY[" + ", ".join(f"'{name}'" for name in names) + "]"


def _grants_function(
    tables: Sequence[str], extra_worker_grants: str, functions: Sequence[str] = _FUNCTIONS
) -> str:
    """The grants function over ``tables`` and ``functions`` (revision 0007 reuses it with
    its own table and trigger function; the defaults are this revision's)."""
    return f"""
CREATE OR REPLACE FUNCTION public.studyq_grant_roles() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, public AS $grants$
DECLARE
    coordinator name;
    worker name;
    analyst name;
    role_name name;
    object record;
BEGIN
    IF to_regprocedure('public.studyq_role_name(text)') IS NULL THEN
        RETURN;  -- deploy/postgres/roles.sql was never applied here: no roles to grant
    END IF;
    coordinator := public.studyq_role_name('coordinator');
    worker := public.studyq_role_name('worker');
    analyst := public.studyq_role_name('analyst');
    FOREACH role_name IN ARRAY ARRAY[coordinator, worker, analyst] LOOP
        IF role_name IS NULL OR to_regrole(quote_ident(role_name)) IS NULL THEN
            RAISE EXCEPTION 'studyq_role_name() names a role that does not exist: %', role_name
                USING HINT = 'Apply deploy/postgres/roles.sql as the superuser.';
        END IF;
    END LOOP;

    -- The coordinator owns every studyq object, whoever created it. A superuser (roles.sql)
    -- or a member of both roles (a person migrating without SET ROLE) can hand it over.
    FOR object IN
        SELECT c.oid::regclass::text AS name, c.relkind, c.relowner AS owner,
               CASE c.relkind WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END AS type
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relname = ANY({_array((*tables, *_VIEWS))})
          AND c.relowner <> to_regrole(quote_ident(coordinator))
        UNION ALL
        SELECT p.oid::regprocedure::text, 'f', p.proowner, 'FUNCTION'
        FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace
          AND p.oid::regprocedure::text = ANY({_array(functions)})
          AND p.proowner <> to_regrole(quote_ident(coordinator))
    LOOP
        IF NOT (pg_has_role(object.owner, 'USAGE') AND pg_has_role(coordinator, 'MEMBER')) THEN
            RAISE EXCEPTION '% is owned by %, not by %', object.name,
                object.owner::regrole, coordinator
                USING HINT = 'Apply deploy/postgres/roles.sql as the superuser: it hands '
                             'every studyq object to the coordinator role.';
        END IF;
        EXECUTE format('ALTER %s %s OWNER TO %I', object.type, object.name, coordinator);
    END LOOP;

    -- Start from nothing, so a newer version of this function also takes rights away.
    EXECUTE format('REVOKE ALL ON %s FROM PUBLIC, %I, %I',
        '{", ".join((*tables, *_VIEWS))}', worker, analyst);

    -- The worker: what orchestrator/store/attempts.py and queries.py do, nothing more.
    EXECUTE format('GRANT SELECT ON studies, runs, studyq_alembic_version TO %I', worker);
    EXECUTE format('GRANT UPDATE ({_RUN_COLUMNS_WORKERS_WRITE}) ON runs TO %I', worker);
    EXECUTE format('GRANT SELECT (study_id, plan_index, attempt), INSERT, '
        'UPDATE (ended_at, outcome, error_kind, error_type, error_message) '
        'ON run_attempts TO %I', worker);
    EXECUTE format('GRANT INSERT ON evaluations, events TO %I', worker);
{extra_worker_grants}
    -- The analyst reads everything.
    EXECUTE format('GRANT SELECT ON %s TO %I', '{", ".join((*tables, *_VIEWS))}', analyst);
END
$grants$;
REVOKE ALL ON FUNCTION public.studyq_grant_roles() FROM PUBLIC;
"""


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
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_grants_function(_TABLES, _PAUSE_GRANTS))
        op.execute("SELECT public.studyq_grant_roles()")
        op.execute(_GRANT_LIKE_RUNS)


# A deployment whose roles.sql predates revision 0003 has no studyq_role_name(): the grants
# function above does nothing there, and its roles hold the rights that old roles.sql gave
# them by name. The new table gets the same rights through the rights those roles hold on
# runs: whoever may update runs (the worker) may read and insert pauses, whoever may read
# runs may read pauses. The current roles.sql replaces all of this with the function's
# grants.
_GRANT_LIKE_RUNS = """
DO $like_runs$
DECLARE
    grantee name;
BEGIN
    IF to_regprocedure('public.studyq_role_name(text)') IS NOT NULL THEN
        RETURN;
    END IF;
    FOR grantee IN
        SELECT DISTINCT g.grantee FROM information_schema.role_column_grants g
        WHERE g.table_schema = 'public' AND g.table_name = 'runs'
          AND g.privilege_type = 'UPDATE' AND g.grantee <> 'PUBLIC'
          AND g.grantee <> g.grantor
    LOOP
        EXECUTE format('GRANT SELECT, INSERT ON study_pauses TO %I', grantee);
    END LOOP;
    FOR grantee IN
        SELECT DISTINCT g.grantee FROM information_schema.role_table_grants g
        WHERE g.table_schema = 'public' AND g.table_name = 'runs'
          AND g.privilege_type = 'SELECT' AND g.grantee <> 'PUBLIC'
          AND g.grantee <> g.grantor
    LOOP
        EXECUTE format('GRANT SELECT ON study_pauses TO %I', grantee);
    END LOOP;
END
$like_runs$;
"""


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_grants_function(_TABLES_0003, ""))  # 0003's function again
    op.drop_index(op.f("ix_runs_study_id_ended_at"), table_name="runs")
    op.drop_table("study_pauses")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("resumed_at")
        batch.drop_column("budget_max_tokens")
        batch.drop_column("budget_max_cost_usd")
