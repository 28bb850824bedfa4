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
-- database dedicated to studyq, once, before the first `studyq db upgrade`:
--
--   psql -v ON_ERROR_STOP=1 -d studyq -f deploy/postgres/roles.sql          # the roles
--   STUDYQ_DATABASE_URL=postgresql://studyq_coordinator:...@host/studyq studyq db upgrade
--
-- This file creates the roles and says which role plays which part (studyq_role_name()). The
-- grants on tables and views, the worker guards and the analysis views belong to the schema:
-- the migrations create them, and every `studyq db upgrade` runs studyq_grant_roles(), which
-- reads the names here. So an upgrade never leaves a role without its grants, and applying
-- this file again is never needed after one (it is harmless: this file runs the same grants
-- when the tables exist, and hands over to the coordinator whatever the superuser owns).
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
-- Why the worker has what it has (orchestrator/store/attempts.py and queries.py; the grants
-- themselves are in studyq_grant_roles(), orchestrator/store/migrations/versions/v0003_*.py):
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

-- 4. Tables the coordinator creates are readable by analysts at once, even ones no
-- migration made. The worker gets nothing by default: its grants are column by column, in
-- studyq_grant_roles(), and a new table it must write gets them from the migration that
-- creates it.
ALTER DEFAULT PRIVILEGES FOR ROLE studyq_coordinator IN SCHEMA public
    GRANT SELECT ON TABLES TO studyq_analyst;
ALTER DEFAULT PRIVILEGES FOR ROLE studyq_coordinator IN SCHEMA public
    GRANT SELECT ON SEQUENCES TO studyq_analyst;

-- 5. Which role plays which part. studyq_grant_roles() (migration 0003 and later) asks this
-- function, so the migrations name no role and grant whatever roles this file created. Owned
-- by the admin applying this file: neither the coordinator nor the worker can change it.
CREATE OR REPLACE FUNCTION public.studyq_role_name(kind text) RETURNS name
LANGUAGE sql IMMUTABLE STRICT AS $role_name$
    SELECT CASE kind
        WHEN 'coordinator' THEN 'studyq_coordinator'
        WHEN 'worker' THEN 'studyq_worker'
        WHEN 'analyst' THEN 'studyq_analyst'
    END::name
$role_name$;

-- 6. The grants, if `studyq db upgrade` has created the tables (it grants them itself).
DO $grants$
BEGIN
    IF to_regclass('public.runs') IS NULL THEN
        RAISE NOTICE 'studyq tables not found: run `studyq db upgrade` as studyq_coordinator; '
            'it creates them and grants the worker and analyst roles their rights.';
        RETURN;
    END IF;
    IF to_regprocedure('public.studyq_grant_roles()') IS NULL THEN
        RAISE NOTICE 'the studyq schema here predates revision 0003: run `studyq db upgrade` '
            'as studyq_coordinator; it installs the guards and views and grants the roles.';
        RETURN;
    END IF;
    PERFORM public.studyq_grant_roles();
END
$grants$;

COMMIT;
