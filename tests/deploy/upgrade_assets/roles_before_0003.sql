-- TEST ASSET, not for use: deploy/postgres/roles.sql as it was before schema revision 0003,
-- when it created the worker guards and the analysis views itself and had to be applied
-- again after every upgrade. test_deploy_roles_upgrade.py sets a database up with it, as an
-- existing deployment is, and upgrades that database.
--
-- studyq's PostgreSQL roles: who may do what in the result store.
--
--   studyq_coordinator  owns the schema: runs `studyq db upgrade`, registers studies, queues,
--                       reconciles, resubmits, cancels and deletes them.
--   studyq_worker       what a worker does and nothing else: reads studies and runs, claims
--                       runs, extends leases, records results, evaluations and events, hands
--                       runs back. It cannot delete, truncate, alter or create anything, cannot
--                       change a run's spec, and cannot rewrite a finished run or attempt.
--   studyq_analyst      read-only: every table, and the analysis_* views that join runs,
--                       conditions, evaluations and attempts.
--
-- Apply it as the database's superuser (or the admin user of a managed PostgreSQL), to a
-- database dedicated to studyq, once before the first `studyq db upgrade` and again after
-- every upgrade (new tables and columns get their grants then):
--
--   psql -v ON_ERROR_STOP=1 -d studyq -f deploy/postgres/roles.sql          # roles, schema rights
--   STUDYQ_DATABASE_URL=postgresql://studyq_coordinator:...@host/studyq studyq db upgrade
--   psql -v ON_ERROR_STOP=1 -d studyq -f deploy/postgres/roles.sql          # grants, views
--
-- It is idempotent (applying it twice changes nothing), runs in one transaction and needs
-- PostgreSQL 14 or newer. It sets
-- no passwords: set them separately, e.g. `\password studyq_worker` in psql, or
-- deploy/postgres/apply-roles.sh, which reads them from the environment or secret files.
--
-- People get their own login roles as members, e.g.
--   CREATE ROLE alice LOGIN IN ROLE studyq_analyst;
--   CREATE ROLE bob LOGIN IN ROLE studyq_coordinator;
--   ALTER ROLE bob IN DATABASE studyq SET role = 'studyq_coordinator';  -- objects bob creates
--                                                                       -- belong to the role
--
-- Why the worker has what it has (orchestrator/store/attempts.py and queries.py):
--   claim      UPDATE runs (status, attempt, attempts_used, lease_owner, lease_expires_at,
--              started_at) ... RETURNING; INSERT run_attempts
--   heartbeat  UPDATE runs (lease_expires_at)
--   finish     SELECT runs ... FOR UPDATE; UPDATE runs (lease_expires_at and the result
--              columns); INSERT evaluations, events; UPDATE run_attempts (the end columns)
--   release    UPDATE runs (status, attempts_used, lease_owner, lease_expires_at, started_at,
--              queued_at); UPDATE run_attempts (the end columns)
--   reads      studies (definition, allowed_references), runs (find_run), and the schema
--              version (a worker refuses a database at another schema version)
-- No table has a serial or identity column, so no role needs USAGE on a sequence.

BEGIN;

-- 1. The roles. LOGIN without a password: nobody can log in with a password until one is set.
DO $roles$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['studyq_coordinator', 'studyq_worker', 'studyq_analyst'] LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = role_name) THEN
            EXECUTE format('CREATE ROLE %I LOGIN', role_name);
        END IF;
    END LOOP;
END
$roles$;

ALTER ROLE studyq_coordinator
    LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT;
ALTER ROLE studyq_worker
    LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT;
ALTER ROLE studyq_analyst
    LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT;
-- Analyst sessions are read-only even before privileges are checked.
ALTER ROLE studyq_analyst SET default_transaction_read_only = on;

-- 2. The database: only studyq's roles connect; nobody creates temporary tables.
DO $database$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format(
        'GRANT CONNECT ON DATABASE %I TO studyq_coordinator, studyq_worker, studyq_analyst',
        current_database()
    );
END
$database$;

-- 3. The schema: everyone may look up names in it; only the coordinator creates objects.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO studyq_coordinator, studyq_worker, studyq_analyst;
GRANT CREATE ON SCHEMA public TO studyq_coordinator;

-- 4. Tables a later migration creates (as studyq_coordinator) are readable by analysts at
-- once. The worker gets nothing by default: its grants are column by column, below, and a
-- new table it must write gets its grant here, with the migration that creates it.
ALTER DEFAULT PRIVILEGES FOR ROLE studyq_coordinator IN SCHEMA public
    GRANT SELECT ON TABLES TO studyq_analyst;
ALTER DEFAULT PRIVILEGES FOR ROLE studyq_coordinator IN SCHEMA public
    GRANT SELECT ON SEQUENCES TO studyq_analyst;

-- 5. The tables, once `studyq db upgrade` has created them.
DO $tables$
DECLARE
    relation record;
BEGIN
    IF to_regclass('public.runs') IS NULL THEN
        RAISE NOTICE 'studyq tables not found: run `studyq db upgrade` as studyq_coordinator, '
            'then apply this file again to grant the worker and analyst roles.';
        RETURN;
    END IF;

    -- The coordinator owns every studyq object, whoever ran the migrations.
    FOR relation IN
        SELECT c.relname, c.relkind
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public'
          AND c.relname IN ('studies', 'conditions', 'runs', 'run_attempts', 'evaluations',
                            'events', 'studyq_alembic_version', 'analysis_runs',
                            'analysis_evaluations', 'analysis_attempts')
          AND c.relowner <> 'studyq_coordinator'::regrole
    LOOP
        EXECUTE format(
            'ALTER %s public.%I OWNER TO studyq_coordinator',
            CASE relation.relkind WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END,
            relation.relname
        );
    END LOOP;

    -- Everything below is done as the owner, as a later migration would do it.
    SET LOCAL ROLE studyq_coordinator;

    -- Start from nothing, so applying a newer version of this file also takes rights away.
    REVOKE ALL ON studies, conditions, runs, run_attempts, evaluations, events,
        studyq_alembic_version FROM PUBLIC, studyq_worker, studyq_analyst;

    -- The worker.
    GRANT SELECT ON studies, runs, studyq_alembic_version TO studyq_worker;
    GRANT UPDATE (
        status, attempt, attempts_used, lease_owner, lease_expires_at, queued_at, started_at,
        ended_at, outputs, metrics, latency_s, cost_usd, input_tokens, output_tokens,
        primary_outcome, trace_refs, provenance, error_kind, error_type, error_message,
        traceback
    ) ON runs TO studyq_worker;
    GRANT SELECT (study_id, plan_index, attempt), INSERT,
        UPDATE (ended_at, outcome, error_kind, error_type, error_message)
        ON run_attempts TO studyq_worker;
    GRANT INSERT ON evaluations, events TO studyq_worker;

    -- Column grants cannot tell a running run from a finished one: these triggers can.
    -- Anyone without the coordinator's rights (the worker) may only move a run along its
    -- lifecycle (queued -> running -> success | failed, or back to queued), never touch a
    -- finished run, and never rewrite an attempt that has ended.
    CREATE OR REPLACE FUNCTION studyq_guard_run_update() RETURNS trigger
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
        IF NEW.status IN ('success', 'failed') AND OLD.status <> 'running' THEN
            RAISE EXCEPTION 'run % of study % is %, not running: it cannot finish',
                OLD.plan_index, OLD.study_id, OLD.status
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN NEW;
    END
    $guard$;

    CREATE OR REPLACE FUNCTION studyq_guard_attempt_update() RETURNS trigger
    LANGUAGE plpgsql AS $guard$
    BEGIN
        IF OLD.ended_at IS NOT NULL THEN
            RAISE EXCEPTION 'attempt % of run % of study % has ended (%); its record is final',
                OLD.attempt, OLD.plan_index, OLD.study_id, OLD.outcome
                USING ERRCODE = 'insufficient_privilege';
        END IF;
        RETURN NEW;
    END
    $guard$;

    CREATE OR REPLACE TRIGGER studyq_guard_run_update
        BEFORE UPDATE ON runs
        FOR EACH ROW
        WHEN (NOT pg_catalog.pg_has_role('studyq_coordinator', 'USAGE'))
        EXECUTE FUNCTION studyq_guard_run_update();

    CREATE OR REPLACE TRIGGER studyq_guard_attempt_update
        BEFORE UPDATE ON run_attempts
        FOR EACH ROW
        WHEN (NOT pg_catalog.pg_has_role('studyq_coordinator', 'USAGE'))
        EXECUTE FUNCTION studyq_guard_attempt_update();

    -- The analyst's views: one row per run, per evaluation row, per attempt, each with the
    -- run's condition, agent, problem, replicate and seed beside it. Views run with their
    -- owner's (the coordinator's) rights; analysts only need SELECT on them. A condition id
    -- may repeat within a study (repeated levels), so each run takes its first condition.
    CREATE OR REPLACE VIEW analysis_runs AS
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
    FROM runs r
    JOIN studies s ON s.study_id = r.study_id
    LEFT JOIN LATERAL (
        SELECT cc.position, cc.admissible, cc.metadata
        FROM conditions cc
        WHERE cc.study_id = r.study_id AND cc.condition_id = r.condition_id
        ORDER BY cc.position
        LIMIT 1
    ) c ON true;

    CREATE OR REPLACE VIEW analysis_evaluations AS
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
    FROM evaluations e
    JOIN runs r ON r.study_id = e.study_id AND r.plan_index = e.plan_index;

    CREATE OR REPLACE VIEW analysis_attempts AS
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
    FROM run_attempts a
    JOIN runs r ON r.study_id = a.study_id AND r.plan_index = a.plan_index;

    REVOKE ALL ON analysis_runs, analysis_evaluations, analysis_attempts
        FROM PUBLIC, studyq_worker, studyq_analyst;

    -- The analyst reads everything.
    GRANT SELECT ON studies, conditions, runs, run_attempts, evaluations, events,
        studyq_alembic_version, analysis_runs, analysis_evaluations, analysis_attempts
        TO studyq_analyst;

    RESET ROLE;
END
$tables$;

COMMIT;
