"""The worker guards, the analysis views and the role grants become part of the schema.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06

Until this revision ``deploy/postgres/roles.sql`` created the guard triggers and the
``analysis_*`` views and granted the roles, so it had to be applied again after every
``studyq db upgrade``. Now the migrations own everything that depends on the tables:

* the guard functions and their triggers. Column grants cannot tell a running run from a
  finished one, so the triggers do, for every session that may not ``UPDATE`` the whole of
  ``runs`` (:data:`_GUARDED`): the worker role. Owners, their members (the coordinator) and
  superusers pass untouched, which also makes the triggers free of role names and harmless
  on a database without studyq's roles;
* the analysis views;
* ``studyq_grant_roles()``, the grants of the roles' rights on these tables and views. It
  reads the role names from ``studyq_role_name(kind)``, which roles.sql installs, and does
  nothing when it is absent (no roles here). ``orchestrator.store.schema.upgrade`` calls it
  after every upgrade, and roles.sql calls it too, so whichever runs last leaves every role
  with exactly its rights. A later revision that adds a table replaces this function with one
  that grants it as well.

SQLite has neither roles nor triggers of this kind: there this revision does nothing.
Everything is frozen here, as of this revision, whatever later revisions say.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = (
    "studies",
    "conditions",
    "runs",
    "run_attempts",
    "evaluations",
    "events",
    "studyq_alembic_version",
)
_VIEWS = ("analysis_runs", "analysis_evaluations", "analysis_attempts")
_FUNCTIONS = (
    "studyq_guard_run_update()",
    "studyq_guard_attempt_update()",
    "studyq_guard_result_insert()",
    "studyq_guard_attempt_insert()",
    "studyq_grant_roles()",
)

_GUARDED = "NOT pg_catalog.has_table_privilege('public.runs'::regclass, 'UPDATE')"
"""Who the triggers hold to the lifecycle: sessions without table-wide ``UPDATE`` on runs.
The worker's rights on runs are column grants; the coordinator owns the table. The
``regclass`` literal is stored as the table's oid, so the check costs no name lookup."""

_TRIGGERS = (
    # (trigger, event, table, function)
    ("studyq_guard_run_update", "UPDATE", "runs", "studyq_guard_run_update"),
    ("studyq_guard_attempt_update", "UPDATE", "run_attempts", "studyq_guard_attempt_update"),
    ("studyq_guard_attempt_insert", "INSERT", "run_attempts", "studyq_guard_attempt_insert"),
    ("studyq_guard_evaluation_insert", "INSERT", "evaluations", "studyq_guard_result_insert"),
    ("studyq_guard_event_insert", "INSERT", "events", "studyq_guard_result_insert"),
)

_GUARD_FUNCTIONS = r"""
-- A guarded session (the worker) may only move a run along its lifecycle: queued -> running
-- -> success | failed, or back to queued; and queued -> success | failed for the late result
-- of the attempt whose lease expired (nobody claimed the run since: same attempt, no owner;
-- orchestrator/store/predicates.py FINISH_FENCE). A finished run is final.
CREATE OR REPLACE FUNCTION public.studyq_guard_run_update() RETURNS trigger
LANGUAGE plpgsql AS $guard$
BEGIN
    IF OLD.status IN ('success', 'failed', 'cancelled') THEN
        RAISE EXCEPTION 'run % of study % is finished (%); a worker cannot change it',
            OLD.plan_index, OLD.study_id, OLD.status
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Only studyq_coordinator resets finished runs (studyq resubmit).';
    END IF;
    IF NEW.status IN ('planned', 'cancelled') THEN
        RAISE EXCEPTION 'a worker cannot set run % of study % to %',
            OLD.plan_index, OLD.study_id, NEW.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.status IN ('success', 'failed') AND NOT (
        OLD.status = 'running'
        OR (OLD.status = 'queued' AND OLD.lease_owner IS NULL AND OLD.attempt > 0
            AND NEW.attempt = OLD.attempt)
    ) THEN
        RAISE EXCEPTION 'run % of study % is %, not running: it cannot finish',
            OLD.plan_index, OLD.study_id, OLD.status
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$guard$;

-- An attempt that has ended is final, except a lost one whose late result this transaction
-- just recorded on the run (the FINISH_FENCE case above: the result's UPDATE comes first).
CREATE OR REPLACE FUNCTION public.studyq_guard_attempt_update() RETURNS trigger
LANGUAGE plpgsql AS $guard$
BEGIN
    IF OLD.ended_at IS NOT NULL AND NOT (
        OLD.outcome = 'lost' AND NEW.outcome IN ('success', 'failed') AND EXISTS (
            SELECT FROM public.runs r
            WHERE r.study_id = OLD.study_id AND r.plan_index = OLD.plan_index
              AND r.attempt = OLD.attempt AND r.status = NEW.outcome
              AND r.xmin = pg_catalog.pg_current_xact_id()::xid
        )
    ) THEN
        RAISE EXCEPTION 'attempt % of run % of study % has ended (%); its record is final',
            OLD.attempt, OLD.plan_index, OLD.study_id, OLD.outcome
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$guard$;

-- A guarded session inserts an attempt only as the claim of that attempt: the run's row was
-- moved to running at this attempt, for this worker, by the same transaction (the claim's
-- UPDATE; on PostgreSQL the same statement, attempts.py _CLAIM_PG). The row is locked
-- (FOR SHARE) so the run cannot change under the check.
CREATE OR REPLACE FUNCTION public.studyq_guard_attempt_insert() RETURNS trigger
LANGUAGE plpgsql AS $guard$
DECLARE
    run record;
BEGIN
    SELECT r.status, r.attempt, r.run_id, r.lease_owner,
           r.xmin = pg_catalog.pg_current_xact_id()::xid AS ours
    INTO run
    FROM public.runs r
    WHERE r.study_id = NEW.study_id AND r.plan_index = NEW.plan_index
    FOR SHARE;
    IF FOUND AND run.ours AND run.status = 'running' AND run.attempt = NEW.attempt
        AND run.run_id = NEW.run_id AND run.lease_owner = NEW.worker
        AND NEW.outcome = 'running' AND NEW.ended_at IS NULL
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'attempt % of run % of study % is not a claim this transaction made',
        NEW.attempt, NEW.plan_index, NEW.study_id
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'A worker records an attempt only by claiming a queued run.';
END
$guard$;

-- A guarded session inserts evaluations and events only for the attempt that is running
-- (the run is running at that attempt), or for the one this transaction just finished (the
-- result's UPDATE comes first: attempts.py finish and finish_pg). Never for a finished run.
CREATE OR REPLACE FUNCTION public.studyq_guard_result_insert() RETURNS trigger
LANGUAGE plpgsql AS $guard$
DECLARE
    run record;
BEGIN
    SELECT r.status, r.attempt, r.run_id,
           r.xmin = pg_catalog.pg_current_xact_id()::xid AS ours
    INTO run
    FROM public.runs r
    WHERE r.study_id = NEW.study_id AND r.plan_index = NEW.plan_index
    FOR SHARE;
    IF FOUND AND run.attempt = NEW.attempt AND run.run_id = NEW.run_id
        AND (run.status = 'running' OR (run.ours AND run.status IN ('success', 'failed')))
    THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% of attempt % of run % of study % refused: the run is % at attempt %',
        TG_TABLE_NAME, NEW.attempt, NEW.plan_index, NEW.study_id,
        coalesce(run.status, 'missing'), run.attempt
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'A worker writes results only with the result of its running attempt.';
END
$guard$;
"""

_VIEWS_SQL = r"""
-- One row per run, per evaluation row, per attempt, each with the run's condition, agent,
-- problem, replicate and seed beside it. Views run with their owner's (the coordinator's)
-- rights; analysts only need SELECT on them. A condition id may repeat within a study
-- (repeated levels), so each run takes its first condition.
CREATE OR REPLACE VIEW public.analysis_runs AS
SELECT
    r.study_id,
    s.definition ->> 'title' AS study_title,
    r.plan_index,
    r.run_id,
    r.condition_id,
    c.position AS condition_position,
    c.admissible AS condition_admissible,
    r.agent_key AS agent_id,
    r.problem_key AS problem_id,
    r.replicate,
    r.seed,
    r.factor_assignments,
    r.block_assignments,
    r.status,
    r.attempt AS attempts,
    r.max_attempts,
    r.queued_at,
    r.started_at,
    r.ended_at,
    r.latency_s,
    r.cost_usd,
    r.input_tokens,
    r.output_tokens,
    r.primary_outcome,
    r.metrics,
    r.outputs,
    r.provenance ->> 'problem_family' AS problem_family,
    r.provenance ->> 'agent_kind' AS agent_kind,
    r.provenance ->> 'pattern_name' AS pattern_name,
    r.provenance ->> 'model_name' AS model_name,
    r.provenance ->> 'model_provider' AS model_provider,
    r.provenance ->> 'host' AS host,
    r.provenance ->> 'worker' AS worker,
    r.provenance -> 'package_versions' AS package_versions,
    r.provenance,
    r.trace_refs,
    r.error_kind,
    r.error_type,
    r.error_message,
    c.metadata AS condition_metadata
FROM public.runs r
JOIN public.studies s ON s.study_id = r.study_id
LEFT JOIN LATERAL (
    SELECT cc.position, cc.admissible, cc.metadata
    FROM public.conditions cc
    WHERE cc.study_id = r.study_id AND cc.condition_id = r.condition_id
    ORDER BY cc.position
    LIMIT 1
) c ON true;

CREATE OR REPLACE VIEW public.analysis_evaluations AS
SELECT
    e.study_id,
    e.plan_index,
    e.seq,
    e.run_id,
    e.attempt,
    r.condition_id,
    r.agent_key AS agent_id,
    r.problem_key AS problem_id,
    r.replicate,
    r.seed,
    r.factor_assignments,
    r.status AS run_status,
    e.evaluator_id,
    e.metric_name,
    e.metric_value,
    CASE WHEN jsonb_typeof(e.metric_value) = 'number'
         THEN (e.metric_value #>> '{}')::double precision
    END AS metric_number,
    e.metric_unit,
    e.aggregation_level,
    e.notes_json,
    e.extra
FROM public.evaluations e
JOIN public.runs r ON r.study_id = e.study_id AND r.plan_index = e.plan_index;

CREATE OR REPLACE VIEW public.analysis_attempts AS
SELECT
    a.study_id,
    a.plan_index,
    a.run_id,
    a.attempt,
    a.worker,
    a.started_at,
    a.ended_at,
    extract(epoch FROM a.ended_at - a.started_at)::double precision AS duration_s,
    a.outcome,
    a.error_kind,
    a.error_type,
    a.error_message,
    r.condition_id,
    r.agent_key AS agent_id,
    r.problem_key AS problem_id,
    r.replicate,
    r.seed,
    r.factor_assignments,
    r.status AS run_status
FROM public.run_attempts a
JOIN public.runs r ON r.study_id = a.study_id AND r.plan_index = a.plan_index;
"""

_RUN_COLUMNS_WORKERS_WRITE = (
    "status, attempt, attempts_used, lease_owner, lease_expires_at, queued_at, started_at, "
    "ended_at, outputs, metrics, latency_s, cost_usd, input_tokens, output_tokens, "
    "primary_outcome, trace_refs, provenance, error_kind, error_type, error_message, traceback"
)
"""What a worker writes of a run (attempts.py claim, heartbeat, finish, release); never the
spec columns (seed, ids, assignments, spec_digest, max_attempts)."""


def _array(names: Sequence[str]) -> str:
    return "ARRAY[" + ", ".join(f"'{name}'" for name in names) + "]"


_GRANTS_FUNCTION = f"""
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
          AND c.relname = ANY({_array((*_TABLES, *_VIEWS))})
          AND c.relowner <> to_regrole(quote_ident(coordinator))
        UNION ALL
        SELECT p.oid::regprocedure::text, 'f', p.proowner, 'FUNCTION'
        FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace
          AND p.oid::regprocedure::text = ANY({_array(_FUNCTIONS)})
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
        '{", ".join((*_TABLES, *_VIEWS))}', worker, analyst);

    -- The worker: what orchestrator/store/attempts.py and queries.py do, nothing more.
    EXECUTE format('GRANT SELECT ON studies, runs, studyq_alembic_version TO %I', worker);
    EXECUTE format('GRANT UPDATE ({_RUN_COLUMNS_WORKERS_WRITE}) ON runs TO %I', worker);
    EXECUTE format('GRANT SELECT (study_id, plan_index, attempt), INSERT, '
        'UPDATE (ended_at, outcome, error_kind, error_type, error_message) '
        'ON run_attempts TO %I', worker);
    EXECUTE format('GRANT INSERT ON evaluations, events TO %I', worker);

    -- The analyst reads everything.
    EXECUTE format('GRANT SELECT ON %s TO %I', '{", ".join((*_TABLES, *_VIEWS))}', analyst);
END
$grants$;
REVOKE ALL ON FUNCTION public.studyq_grant_roles() FROM PUBLIC;
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(_GUARD_FUNCTIONS)
    for trigger, event, table, function in _TRIGGERS:
        # DROP + CREATE rather than CREATE OR REPLACE TRIGGER (PostgreSQL 14): replaces the
        # triggers roles.sql created before this revision, on any supported server.
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON public.{table}")
        op.execute(
            f"CREATE TRIGGER {trigger} BEFORE {event} ON public.{table} FOR EACH ROW "
            f"WHEN ({_GUARDED}) EXECUTE FUNCTION public.{function}()"
        )
    op.execute(_VIEWS_SQL)
    op.execute(_GRANTS_FUNCTION)
    op.execute("SELECT public.studyq_grant_roles()")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for view in reversed(_VIEWS):
        op.execute(f"DROP VIEW IF EXISTS public.{view}")
    for trigger, _, table, _ in _TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON public.{table}")
    for function in _FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS public.{function}")
