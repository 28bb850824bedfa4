"""What each studyq database role must not do: one catalog of statements per role, each
of which must fail with ``InsufficientPrivilege`` (test_deploy_roles.py runs them)."""

from __future__ import annotations

STUDY_TABLES = (
    "studies",
    "conditions",
    "runs",
    "run_attempts",
    "evaluations",
    "events",
    "study_pauses",
    "study_counts",
    "studyq_alembic_version",
)

# (id, statement, whether it must run outside a transaction block). Placeholders: {study},
# {finished}, {failed}, {queued}, {running}: the sweep's study and runs; {self}: the login
# role; {worker_role}, {coordinator_role}, {analyst_role}: the groups; {admin_pid}.
Forbidden = tuple[str, str, bool]

_COMMON: list[Forbidden] = [
    ("create-role", "CREATE ROLE studyq_injected_role", False),
    ("become-superuser", "ALTER ROLE {self} SUPERUSER", False),
    ("create-database", "CREATE DATABASE studyq_injected_database", True),
    ("create-schema", "CREATE SCHEMA injected", False),
    ("create-temp-table", "CREATE TEMP TABLE injected (id integer)", False),
    ("terminate-superuser-backend", "SELECT pg_terminate_backend({admin_pid})", False),
    ("read-server-file", "SELECT pg_read_file('/etc/hostname')", False),
    ("read-password-hashes", "SELECT rolpassword FROM pg_authid", False),
    ("copy-to-program", "COPY (SELECT 1) TO PROGRAM 'true'", False),
    ("alter-system", "ALTER SYSTEM SET log_statement = 'none'", True),
]

WORKER_FORBIDDEN: list[Forbidden] = [
    *_COMMON,
    ("drop-runs", "DROP TABLE runs", False),
    ("drop-studies", "DROP TABLE studies", False),
    ("drop-view", "DROP VIEW analysis_runs", False),
    ("add-column", "ALTER TABLE runs ADD COLUMN injected integer", False),
    ("drop-column", "ALTER TABLE runs DROP COLUMN seed", False),
    ("rename-table", "ALTER TABLE run_attempts RENAME TO attempts_gone", False),
    ("truncate-runs", "TRUNCATE runs CASCADE", False),
    ("truncate-evaluations", "TRUNCATE evaluations", False),
    ("delete-runs", "DELETE FROM runs WHERE study_id = {study}", False),
    ("delete-attempts", "DELETE FROM run_attempts WHERE study_id = {study}", False),
    ("delete-evaluations", "DELETE FROM evaluations", False),
    ("delete-events", "DELETE FROM events", False),
    ("delete-study", "DELETE FROM studies WHERE study_id = {study}", False),
    (
        "insert-study",
        "INSERT INTO studies (study_id, definition, definition_hash, plan_fingerprint, "
        "run_count, condition_count, max_attempts, submitted_by, submitted_at, "
        "allowed_references) VALUES ('forged', '{{}}', 'h', 'f', 0, 0, 1, 'x', now(), '[]')",
        False,
    ),
    (
        "widen-import-allow-list",
        "UPDATE studies SET allowed_references = '[\"os:system\"]' WHERE study_id = {study}",
        False,
    ),
    ("insert-condition", "INSERT INTO conditions (study_id, position) VALUES ({study}, 99)", False),
    ("insert-run", "INSERT INTO runs (study_id, plan_index) VALUES ({study}, 999)", False),
    (
        "change-seed",
        "UPDATE runs SET seed = 1 WHERE study_id = {study} AND plan_index = {queued}",
        False,
    ),
    (
        "change-max-attempts",
        "UPDATE runs SET max_attempts = 100 WHERE study_id = {study} AND plan_index = {queued}",
        False,
    ),
    (
        "change-assignments",
        "UPDATE runs SET factor_assignments = '{{}}' WHERE study_id = {study} "
        "AND plan_index = {queued}",
        False,
    ),
    ("change-run-id", "UPDATE runs SET run_id = 'forged' WHERE study_id = {study}", False),
    (
        "rewrite-finished-result",
        "UPDATE runs SET primary_outcome = '0', metrics = '{{\"primary_outcome\": 0}}' "
        "WHERE study_id = {study} AND plan_index = {finished}",
        False,
    ),
    (
        "reopen-finished-run",
        "UPDATE runs SET status = 'queued' WHERE study_id = {study} AND plan_index = {finished}",
        False,
    ),
    (
        "turn-failure-into-success",
        "UPDATE runs SET status = 'success', error_kind = NULL "
        "WHERE study_id = {study} AND plan_index = {failed}",
        False,
    ),
    (
        "finish-unclaimed-run",
        "UPDATE runs SET status = 'success' WHERE study_id = {study} AND plan_index = {queued}",
        False,
    ),
    (
        "cancel-run",
        "UPDATE runs SET status = 'cancelled' WHERE study_id = {study} AND plan_index = {queued}",
        False,
    ),
    (
        "unplan-running-run",
        "UPDATE runs SET status = 'planned' WHERE study_id = {study} AND plan_index = {running}",
        False,
    ),
    (
        "rewrite-ended-attempt",
        "UPDATE run_attempts SET outcome = 'success' WHERE study_id = {study} "
        "AND plan_index = {failed}",
        False,
    ),
    ("change-attempt-worker", "UPDATE run_attempts SET worker = 'someone-else'", False),
    ("update-evaluation", "UPDATE evaluations SET metric_value = '0'", False),
    ("update-event", "UPDATE events SET text = 'forged'", False),
    ("read-conditions", "SELECT * FROM conditions", False),
    ("read-evaluations", "SELECT * FROM evaluations", False),
    ("read-events", "SELECT * FROM events", False),
    ("read-analysis-view", "SELECT * FROM analysis_runs", False),
    ("read-attempt-workers", "SELECT worker FROM run_attempts", False),
    ("create-table", "CREATE TABLE public.injected (id integer)", False),
    ("create-view", "CREATE VIEW public.injected AS SELECT 1 AS one", False),
    (
        "create-function",
        "CREATE FUNCTION public.injected() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
        False,
    ),
    ("create-index", "CREATE INDEX injected ON runs (seed)", False),
    (
        "create-trigger",
        "CREATE TRIGGER injected BEFORE UPDATE ON runs FOR EACH ROW "
        "EXECUTE FUNCTION studyq_guard_run_update()",
        False,
    ),
    ("disable-guard", "ALTER TABLE runs DISABLE TRIGGER studyq_guard_run_update", False),
    ("drop-guard", "DROP TRIGGER studyq_guard_run_update ON runs", False),
    (
        "replace-guard",
        "CREATE OR REPLACE FUNCTION studyq_guard_run_update() RETURNS trigger "
        "LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END'",
        False,
    ),
    ("comment", "COMMENT ON TABLE runs IS 'forged'", False),
    ("take-ownership", "ALTER TABLE runs OWNER TO {self}", False),
    ("grant-to-others", "GRANT SELECT ON conditions TO PUBLIC", False),
    ("grant-role", "GRANT {worker_role} TO {analyst_role}", False),
    ("become-coordinator", "SET ROLE {coordinator_role}", False),
    ("forge-schema-version", "UPDATE studyq_alembic_version SET version_num = 'forged'", False),
    ("delete-schema-version", "DELETE FROM studyq_alembic_version", False),
    ("lock-studies", "LOCK TABLE studies IN EXCLUSIVE MODE", False),
    ("lock-study-row", "SELECT * FROM studies FOR UPDATE", False),
    ("resume-paused-study", "DELETE FROM study_pauses", False),
    ("rewrite-pause", "UPDATE study_pauses SET reason = 'budget'", False),
    # the counts are the triggers' alone (SECURITY DEFINER): a worker cannot forge progress
    ("forge-count", "UPDATE study_counts SET n = n + 1", False),
    ("insert-count", "INSERT INTO study_counts VALUES ({study}, 0, 'success', 1)", False),
    ("read-counts", "SELECT * FROM study_counts", False),
    ("replace-count-function", "CREATE OR REPLACE FUNCTION studyq_count_runs() RETURNS trigger "
     "LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'", False),
    ("drop-count-trigger", "DROP TRIGGER studyq_count_runs_update ON runs", False),
]


def _analyst_writes() -> list[Forbidden]:
    writes: list[Forbidden] = []
    for table in STUDY_TABLES:
        column = "version_num" if table == "studyq_alembic_version" else "study_id"
        writes += [
            (f"insert-{table}", f"INSERT INTO {table} DEFAULT VALUES", False),
            (f"update-{table}", f"UPDATE {table} SET {column} = {column}", False),
            (f"delete-{table}", f"DELETE FROM {table}", False),
            (f"truncate-{table}", f"TRUNCATE {table} CASCADE", False),
        ]
    return writes


ANALYST_FORBIDDEN: list[Forbidden] = [
    *_COMMON,
    *_analyst_writes(),
    ("drop-runs", "DROP TABLE runs", False),
    ("drop-view", "DROP VIEW analysis_runs", False),
    ("replace-view", "CREATE OR REPLACE VIEW analysis_runs AS SELECT 1 AS one", False),
    ("add-column", "ALTER TABLE runs ADD COLUMN injected integer", False),
    ("create-table", "CREATE TABLE public.injected (id integer)", False),
    ("create-view", "CREATE VIEW public.injected AS SELECT 1 AS one", False),
    ("create-index", "CREATE INDEX injected ON runs (seed)", False),
    ("lock-run-rows", "SELECT * FROM runs FOR UPDATE", False),
    ("lock-runs", "LOCK TABLE runs IN EXCLUSIVE MODE", False),
    ("disable-guard", "ALTER TABLE runs DISABLE TRIGGER studyq_guard_run_update", False),
    ("comment", "COMMENT ON TABLE runs IS 'forged'", False),
    ("grant-role", "GRANT {analyst_role} TO {worker_role}", False),
    ("become-worker", "SET ROLE {worker_role}", False),
]

COORDINATOR_FORBIDDEN: list[Forbidden] = [
    *_COMMON,
    ("grant-itself-createrole", "ALTER ROLE {self} CREATEROLE", False),
    ("grant-itself-bypassrls", "ALTER ROLE {self} BYPASSRLS", False),
    ("set-worker-password", "ALTER ROLE {worker_role} PASSWORD 'forged'", False),
    ("drop-analyst-role", "DROP ROLE {analyst_role}", False),
    ("grant-itself-worker", "GRANT {worker_role} TO {self}", False),
    ("grant-worker-coordinator", "GRANT {coordinator_role} TO {worker_role}", False),
    ("grant-server-files", "GRANT pg_read_server_files TO {self}", False),
    ("drop-other-database", "DROP DATABASE postgres", True),
    ("alter-other-database", "ALTER DATABASE postgres CONNECTION LIMIT 1", False),
    ("create-tablespace", "CREATE TABLESPACE injected LOCATION '/nonexistent'", True),
    ("copy-from-server-file", "COPY runs FROM '/etc/hostname'", False),
    ("copy-to-server-file", "COPY runs TO '/nonexistent/studyq-dump.csv'", False),
    ("list-server-directory", "SELECT pg_ls_dir('.')", False),
    ("reload-configuration", "SELECT pg_reload_conf()", False),
    ("checkpoint", "CHECKPOINT", False),
    ("skip-triggers", "SET session_replication_role = replica", False),
    ("load-library", "LOAD 'passwordcheck'", False),
    ("create-c-function", "CREATE FUNCTION injected() RETURNS void LANGUAGE c AS 'x', 'y'", False),
    (
        "create-internal-function",
        "CREATE FUNCTION injected() RETURNS integer LANGUAGE internal AS 'int4pl'",
        False,
    ),
    (
        "create-event-trigger",
        "CREATE EVENT TRIGGER injected ON ddl_command_start "
        "EXECUTE FUNCTION studyq_guard_run_update()",
        False,
    ),
    ("become-superuser-role", "SET ROLE postgres", False),
    ("become-superuser-session", "SET SESSION AUTHORIZATION postgres", False),
    ("cancel-superuser-backend", "SELECT pg_cancel_backend({admin_pid})", False),
    ("import-server-file", "SELECT lo_import('/etc/hostname')", False),
    ("reassign-superuser-objects", "REASSIGN OWNED BY postgres TO {self}", False),
    ("take-public-schema", "ALTER SCHEMA public OWNER TO {self}", False),
    ("drop-public-schema", "DROP SCHEMA public", False),
    ("comment-on-database", "COMMENT ON DATABASE postgres IS 'forged'", False),
    ("create-publication", "CREATE PUBLICATION injected FOR TABLE runs", False),
]

CATALOGS = {
    "worker": WORKER_FORBIDDEN,
    "analyst": ANALYST_FORBIDDEN,
    "coordinator": COORDINATOR_FORBIDDEN,
}
