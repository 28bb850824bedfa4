"""deploy/postgres/roles.sql on the real PostgreSQL: each role can do its job and nothing else.

Given a database prepared as docs/deploy.md says (roles.sql, ``studyq db upgrade`` as the
coordinator, roles.sql again) with login members of test-unique stand-ins for the three roles
(see deploy_pg), a coordinator registers a sweep and a worker runs it through the result
store exactly as ``studyq worker`` does (claim, heartbeat, finish with evaluations and events,
release, a stale finish refused). Then every statement of a catalog of things each role must
not do is tried, one per test, and must fail with ``InsufficientPrivilege``; the analyst reads
every view; backups restore with their grants.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from deploy_files import REPO
from deploy_forbidden import CATALOGS, STUDY_TABLES
from deploy_pg import HOST, KINDS, PG_PORT, Roles, RolesCluster, admin_connect, role_session
from psycopg import errors

from orchestrator.cli import main as studyq_main
from orchestrator.contracts.results import ErrorKind, RunResult, RunStatus
from orchestrator.embedded import register
from orchestrator.export import export_artifacts
from orchestrator.store import Claim, ResultStore
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare

pytestmark = pytest.mark.integration

VIEWS = ("analysis_runs", "analysis_evaluations", "analysis_attempts")
WORKER = "slurm-a@node1:4242"


def _prepared(study_id: str, replicates: int) -> Any:
    return prepare(
        parse_study(
            {
                "study_id": study_id,
                "title": "roles test",
                "agent_specs": ["noop"],
                "problem_ids": ["noop"],
                "run_budget": {"replicates": replicates},
            }
        )
    )


def _result(run_id: str, *, failed: bool = False) -> RunResult:
    now = datetime.now(UTC)
    return RunResult(
        run_id=run_id,
        status=RunStatus.FAILED if failed else RunStatus.SUCCESS,
        started_at=now,
        ended_at=now,
        outputs={"design": [1.0, 2.0]},
        metrics={"primary_outcome": 1.5, "cost_usd": 0.25, "input_tokens": 10},
        evaluations=[
            {"evaluator_id": "objective", "metric_name": "mass", "metric_value": 1.5},
            {"evaluator_id": "objective", "metric_name": "feasible", "metric_value": True},
        ],
        events=[{"event_type": "step", "text": "first"}, {"event_type": "step", "text": "done"}],
        provenance={"host": "node1", "worker": WORKER, "model_name": "demo"},
        error_kind=ErrorKind.ERROR if failed else None,
        error_type="ValueError" if failed else None,
        error_message="on purpose" if failed else None,
    )


@dataclass
class Sweep:
    """What the worker left behind, by plan index."""

    study_id: str
    finished: int  # success
    failed: int
    released: int  # handed back once, then finished by a second claim
    queued: int  # never claimed
    running: int  # claimed, still under its lease
    stale_refused: bool
    heartbeats: list[bool]
    claims: dict[int, Claim]


@pytest.fixture(scope="module")
def sweep(roles: Roles, roles_db: str) -> Sweep:
    """Given a registered, queued study of 7 runs, the worker role runs it."""
    study_id = f"roles-{uuid.uuid4().hex[:8]}"
    prepared = _prepared(study_id, replicates=7)
    specs = list(prepared.run_specs())
    with ResultStore.open(roles.url("coordinator", roles_db)) as coordinator:
        register(coordinator, prepared)
        coordinator.mark_queued(study_id, [spec.index for spec in specs])
    with ResultStore.open(roles.url("worker", roles_db)) as worker:
        info = worker.find_study(study_id)
        assert info is not None and info.definition["study_id"] == study_id
        claims: dict[int, Claim] = {}
        heartbeats = []
        for spec in specs[:5]:
            claim = worker.claim_run(study_id, spec.index, worker=WORKER, lease_s=60)
            assert claim is not None, f"the worker could not claim run {spec.index}"
            claims[spec.index] = claim
            heartbeats.append(worker.heartbeat(claim, 60))
        for index in (0, 1, 2):
            assert worker.finish_run(claims[index], _result(specs[index].run_id))
        assert worker.finish_run(claims[3], _result(specs[3].run_id, failed=True))
        assert worker.release_run(claims[4])
        again = worker.claim_run(study_id, 4, worker=WORKER, lease_s=60)
        assert again is not None and again.attempt == 2
        assert worker.find_run(study_id, 4) is not None
        stale = worker.finish_run(claims[4], _result(specs[4].run_id))
        assert worker.finish_run(again, _result(specs[4].run_id))
        running = worker.claim_run(study_id, 6, worker=WORKER, lease_s=600)
        assert running is not None
        claims[6] = running
    return Sweep(study_id, 0, 3, 4, 5, 6, not stale, heartbeats, claims)


@pytest.fixture(scope="module")
def admin_pid() -> Iterator[int]:
    """A superuser backend that no role may signal (pg_terminate_backend must fail)."""
    with admin_connect() as admin:
        row = admin.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        yield int(row[0])


# -- each role does its job -----------------------------------------------------------------


def test_migrations_run_by_the_coordinator_leave_it_owning_every_object(
    roles: Roles, roles_db: str
) -> None:
    with admin_connect(roles_db) as admin:
        owners = dict(
            admin.execute(
                "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'v')"
            ).fetchall()
        )
    assert set(owners) == {*STUDY_TABLES, *VIEWS}
    assert set(owners.values()) == {roles.group("coordinator")}


def test_the_count_trigger_runs_with_the_coordinators_rights_and_a_fixed_search_path(
    roles: Roles, roles_db: str
) -> None:
    # The worker has no right on study_counts: its claims and results are counted by a
    # SECURITY DEFINER function, which must be the coordinator's and resolve no name through
    # a search_path the caller controls.
    with admin_connect(roles_db) as admin:
        row = admin.execute(
            "SELECT pg_get_userbyid(p.proowner), p.prosecdef, p.proconfig FROM pg_proc p "
            "WHERE p.oid = 'public.studyq_count_runs()'::regprocedure"
        ).fetchone()
    assert row is not None
    owner, definer, config = row
    assert (owner, definer) == (roles.group("coordinator"), True)
    assert config == ["search_path=pg_catalog, public, pg_temp"]


def test_a_sweep_completes_with_the_worker_connected_as_the_worker_role(
    roles: Roles, roles_db: str, sweep: Sweep
) -> None:
    assert all(sweep.heartbeats)
    assert sweep.stale_refused, "a finish with a stale attempt must write nothing"
    with ResultStore.open(roles.url("coordinator", roles_db)) as store:
        counts = store.count_by_status(sweep.study_id)
        assert counts == {
            "planned": 0,
            "queued": 1,
            "running": 1,
            "success": 4,
            "failed": 1,
            "cancelled": 0,
        }
        released = store.find_run(sweep.study_id, sweep.released)
        assert released is not None
        assert (released.status, released.attempt, released.attempts_used) == ("success", 2, 1)
        outcomes = [
            (a.index, a.attempt, a.outcome)
            for a in store.iter_attempts(sweep.study_id)
            if a.index in (sweep.released, sweep.failed)
        ]
        assert outcomes == [(3, 1, "failed"), (4, 1, "released"), (4, 2, "success")]
        assert len(list(store.iter_evaluations(sweep.study_id))) == 2 * 5
        assert len(list(store.iter_events(sweep.study_id))) == 2 * 5


def test_studyq_check_passes_as_the_worker_role(
    roles: Roles, roles_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = studyq_main(["check", "--db", roles.url("worker", roles_db), "--no-broker"])
    assert code == 0, capsys.readouterr().err


# The worker's privileges, exactly: anything more is a hole, anything less breaks a worker
# (orchestrator/store/attempts.py and queries.py; see the header of roles.sql).
RUN_COLUMNS_WORKERS_WRITE = {
    "status", "attempt", "attempts_used", "lease_owner", "lease_expires_at", "queued_at",
    "started_at", "ended_at", "outputs", "metrics", "latency_s", "cost_usd", "input_tokens",
    "output_tokens", "primary_outcome", "trace_refs", "provenance", "error_kind",
    "error_type", "error_message", "traceback",
}  # fmt: skip
WORKER_TABLE_PRIVILEGES = {
    ("studies", "SELECT"),
    ("runs", "SELECT"),
    ("studyq_alembic_version", "SELECT"),
    ("run_attempts", "INSERT"),
    ("evaluations", "INSERT"),
    ("events", "INSERT"),
    ("study_pauses", "SELECT"),  # every claim tests for a pause (budget, breaker)
    ("study_pauses", "INSERT"),  # a worker trips one; only the coordinator resumes
}
WORKER_COLUMN_ONLY_PRIVILEGES = {
    ("runs", "UPDATE"): RUN_COLUMNS_WORKERS_WRITE,
    ("run_attempts", "SELECT"): {"study_id", "plan_index", "attempt"},
    ("run_attempts", "UPDATE"): {
        "ended_at",
        "outcome",
        "error_kind",
        "error_type",
        "error_message",
    },
}


def test_the_worker_role_has_exactly_the_privileges_a_worker_needs(
    roles: Roles, roles_db: str
) -> None:
    group = roles.group("worker")
    with admin_connect(roles_db) as admin:
        tables = set(
            admin.execute(
                "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
                "WHERE grantee = %s",
                [group],
            ).fetchall()
        )
        columns: dict[tuple[str, str], set[str]] = {}
        for table, privilege, column in admin.execute(
            "SELECT table_name, privilege_type, column_name "
            "FROM information_schema.column_privileges WHERE grantee = %s",
            [group],
        ).fetchall():
            if (table, privilege) not in tables:
                columns.setdefault((table, privilege), set()).add(column)
        memberships = admin.execute(
            "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid "
            "WHERE m.member = %s::regrole",
            [group],
        ).fetchall()
    assert tables == WORKER_TABLE_PRIVILEGES
    assert columns == WORKER_COLUMN_ONLY_PRIVILEGES
    assert memberships == []


# -- what each role must not do (the catalogs are in deploy_forbidden.py) ---------------------


def test_each_role_has_at_least_30_forbidden_statements_and_no_duplicate_ids() -> None:
    for kind, catalog in CATALOGS.items():
        ids = [entry[0] for entry in catalog]
        assert len(ids) >= 30, kind
        assert len(ids) == len(set(ids)), kind


def _cases() -> list[Any]:
    return [
        pytest.param(kind, statement, autocommit, id=f"{kind}-{name}")
        for kind, catalog in CATALOGS.items()
        for name, statement, autocommit in catalog
    ]


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@pytest.mark.parametrize(("kind", "statement", "autocommit"), _cases())
def test_forbidden_statements_are_denied(
    roles: Roles,
    roles_db: str,
    sweep: Sweep,
    admin_pid: int,
    kind: str,
    statement: str,
    autocommit: bool,
) -> None:
    query = statement.format(
        study=f"'{sweep.study_id}'",
        finished=sweep.finished,
        failed=sweep.failed,
        queued=sweep.queued,
        running=sweep.running,
        self=_quoted(roles.login(kind)),
        worker_role=_quoted(roles.group("worker")),
        coordinator_role=_quoted(roles.group("coordinator")),
        analyst_role=_quoted(roles.group("analyst")),
        admin_pid=admin_pid,
    )
    with role_session(roles, kind, roles_db) as session:
        if autocommit:
            with pytest.raises(errors.InsufficientPrivilege):
                session.execute(query)
            return
        # Inside a transaction that is always rolled back: a statement that wrongly
        # succeeds fails the test without changing what the other tests see.
        with (
            pytest.raises(errors.InsufficientPrivilege),
            session.transaction(force_rollback=True),
        ):
            session.execute(query)


# -- the analyst ----------------------------------------------------------------------------


def test_the_analyst_reads_every_view_with_runs_conditions_and_evaluations_joined(
    roles: Roles, roles_db: str, sweep: Sweep
) -> None:
    with role_session(roles, "analyst", roles_db) as session:
        views = {
            row[0]
            for row in session.execute(
                "SELECT viewname FROM pg_views WHERE schemaname = 'public'"
            ).fetchall()
        }
        assert views == set(VIEWS)
        runs = session.execute(
            "SELECT plan_index, status, condition_position, agent_id, seed, host, attempts "
            "FROM analysis_runs WHERE study_id = %s ORDER BY plan_index",
            [sweep.study_id],
        ).fetchall()
        evaluations = session.execute(
            "SELECT plan_index, metric_name, metric_number, agent_id, seed "
            "FROM analysis_evaluations WHERE study_id = %s ORDER BY plan_index, seq",
            [sweep.study_id],
        ).fetchall()
        attempts = session.execute(
            "SELECT plan_index, attempt, outcome, worker, duration_s IS NOT NULL "
            "FROM analysis_attempts WHERE study_id = %s AND plan_index = %s ORDER BY attempt",
            [sweep.study_id, sweep.released],
        ).fetchall()
        for table in STUDY_TABLES:
            session.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert [row[0] for row in runs] == list(range(7)), "one row per run, none doubled"
    assert runs[sweep.finished][1:] == ("success", 0, "noop", runs[sweep.finished][4], "node1", 1)
    assert runs[sweep.released][6] == 2
    assert len(evaluations) == 10
    assert evaluations[0][1:3] == ("mass", 1.5)
    assert evaluations[1][1:3] == ("feasible", None), "a boolean metric is not a number"
    assert attempts == [(4, 1, "released", WORKER, True), (4, 2, "success", WORKER, True)]


def test_the_analyst_can_export_a_study(
    roles: Roles, roles_db: str, sweep: Sweep, tmp_path: Path
) -> None:
    with ResultStore.open(roles.url("analyst", roles_db)) as store:
        report = export_artifacts(store, sweep.study_id, tmp_path / "artifacts")
    assert report.runs == 5 and report.partial


def test_a_session_of_the_analyst_role_itself_is_read_only(roles: Roles, roles_db: str) -> None:
    """The role logs in read-only (ALTER ROLE ... SET default_transaction_read_only)."""
    with admin_connect() as admin:
        admin.execute(
            f"ALTER ROLE {_quoted(roles.group('analyst'))} PASSWORD '{roles.passwords['analyst']}'"
        )
    dsn = roles.dsn("analyst", roles_db).replace(roles.login("analyst"), roles.group("analyst"))
    with psycopg.connect(dsn, autocommit=True) as session:
        row = session.execute("SHOW default_transaction_read_only").fetchone()
        assert row == ("on",)
        with pytest.raises(errors.ReadOnlySqlTransaction):
            session.execute("CREATE TEMP TABLE injected (id integer)")


# -- the coordinator ------------------------------------------------------------------------


def test_the_coordinator_reconciles_resubmits_cancels_and_deletes(
    roles: Roles, roles_db: str
) -> None:
    """Given a finished study, the coordinator role resets its failed run (through the
    worker guard, which lets it pass), cancels and deletes the study."""
    study_id = f"roles-coord-{uuid.uuid4().hex[:8]}"
    prepared = _prepared(study_id, replicates=2)
    specs = list(prepared.run_specs())
    with (
        ResultStore.open(roles.url("coordinator", roles_db)) as coordinator,
        ResultStore.open(roles.url("worker", roles_db)) as worker,
    ):
        register(coordinator, prepared)
        coordinator.mark_queued(study_id, [spec.index for spec in specs])
        for spec in specs:
            claim = worker.claim_run(study_id, spec.index, worker=WORKER, lease_s=60)
            assert claim is not None
            assert worker.finish_run(claim, _result(spec.run_id, failed=spec.index == 0))
        assert coordinator.reconcile(study_id, queued_timeout_s=1).requeued == 0
        assert coordinator.requeue_for_resubmit(study_id) == 1
        assert coordinator.mark_queued(study_id, [0]) == 1
        assert coordinator.cancel(study_id) == 1
        assert coordinator.delete_study(study_id)
        assert coordinator.find_study(study_id) is None


def test_tables_of_later_migrations_follow_the_default_privileges(
    roles: Roles, roles_db: str
) -> None:
    """A table the coordinator creates later is readable by analysts, and the worker gets
    nothing until roles.sql grants it."""
    with role_session(roles, "coordinator", roles_db) as coordinator:
        coordinator.execute("CREATE TABLE later_migration (id integer)")
        coordinator.execute("INSERT INTO later_migration VALUES (1)")
    try:
        with role_session(roles, "analyst", roles_db) as analyst:
            assert analyst.execute("SELECT id FROM later_migration").fetchall() == [(1,)]
        with role_session(roles, "worker", roles_db) as worker:
            with pytest.raises(errors.InsufficientPrivilege):
                worker.execute("SELECT id FROM later_migration")
            with pytest.raises(errors.InsufficientPrivilege):
                worker.execute("INSERT INTO later_migration VALUES (2)")
    finally:
        with role_session(roles, "coordinator", roles_db) as coordinator:
            coordinator.execute("DROP TABLE later_migration")


# -- applying roles.sql ----------------------------------------------------------------------

_SNAPSHOT_QUERIES = {
    "relations": "SELECT c.relname, c.relkind, pg_get_userbyid(c.relowner), c.relacl::text "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = 'public' ORDER BY 1",
    "columns": "SELECT c.relname, a.attname, a.attacl::text FROM pg_attribute a "
    "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = 'public' AND a.attacl IS NOT NULL ORDER BY 1, 2",
    "default_acl": "SELECT defaclrole::regrole::text, defaclobjtype, defaclacl::text "
    "FROM pg_default_acl ORDER BY 1, 2",
    "schema": "SELECT nspacl::text FROM pg_namespace WHERE nspname = 'public'",
    "database": "SELECT datacl::text FROM pg_database WHERE datname = current_database()",
    "triggers": "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger "
    "WHERE NOT tgisinternal ORDER BY 1",
    "functions": "SELECT proname, md5(prosrc), pg_get_userbyid(proowner) FROM pg_proc "
    "WHERE pronamespace = 'public'::regnamespace ORDER BY 1",
    "views": "SELECT viewname, md5(definition) FROM pg_views WHERE schemaname = 'public' "
    "ORDER BY 1",
}


def _snapshot(database: str, roles: Roles) -> dict[str, Any]:
    with admin_connect(database) as admin:
        snapshot: dict[str, Any] = {
            name: admin.execute(query).fetchall() for name, query in _SNAPSHOT_QUERIES.items()
        }
        snapshot["roles"] = admin.execute(
            "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication, "
            "rolbypassrls, rolconfig FROM pg_roles WHERE rolname = ANY(%s) ORDER BY 1",
            [[roles.group(kind) for kind in KINDS]],
        ).fetchall()
    return snapshot


def test_applying_roles_sql_again_changes_nothing(
    roles_cluster: RolesCluster, roles_db: str, sweep: Sweep
) -> None:
    before = _snapshot(roles_db, roles_cluster.roles)
    output = roles_cluster.apply(roles_db)
    assert _snapshot(roles_db, roles_cluster.roles) == before
    assert "ERROR" not in output and "WARNING" not in output


def test_before_the_first_upgrade_roles_sql_says_what_to_do_next(
    roles_cluster: RolesCluster,
) -> None:
    database = roles_cluster.new_database("empty")
    output = roles_cluster.apply(database)
    if shutil.which("psql"):
        assert "run `studyq db upgrade` as" in output and "grants the worker" in output


def test_roles_sql_takes_over_tables_migrated_by_the_superuser(
    roles_cluster: RolesCluster,
) -> None:
    """Given migrations run as postgres by mistake, roles.sql hands every object to the
    coordinator, and a worker can work."""
    roles = roles_cluster.roles
    database = roles_cluster.prepared_database("super", migrate_as="postgres")
    with admin_connect(database) as admin:
        owners = {
            row[0]
            for row in admin.execute(
                "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v')"
            ).fetchall()
        }
    assert owners == {roles.group("coordinator")}
    _one_run(roles, database)


def _one_run(roles: Roles, database: str) -> None:
    study_id = f"roles-one-{uuid.uuid4().hex[:8]}"
    prepared = _prepared(study_id, replicates=1)
    (spec,) = list(prepared.run_specs())
    with ResultStore.open(roles.url("coordinator", database)) as coordinator:
        register(coordinator, prepared)
        coordinator.mark_queued(study_id, [spec.index])
    with ResultStore.open(roles.url("worker", database)) as worker:
        claim = worker.claim_run(study_id, spec.index, worker=WORKER, lease_s=60)
        assert claim is not None
        assert worker.finish_run(claim, _result(spec.run_id))


# -- backup and restore (docs/deploy.md) -----------------------------------------------------


def _documented_options(command: str) -> set[str]:
    """The long options of the first ``command`` line in docs/deploy.md (values dropped,
    except ``--format``'s)."""
    text = (REPO / "docs" / "deploy.md").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith(f"{command} "))
    return {
        token if token.startswith("--format=") else token.split("=")[0]
        for token in line.split()
        if token.startswith("--")
    }


@pytest.mark.slow
def test_backup_and_restore_keep_results_owners_and_grants(
    roles_cluster: RolesCluster, roles_db: str, sweep: Sweep, tmp_path: Path
) -> None:
    """pg_dump as the coordinator, pg_restore into a new database as the superuser, apply
    roles.sql: the results are all there and every role works as before."""
    pg_dump, pg_restore = shutil.which("pg_dump"), shutil.which("pg_restore")
    if pg_dump is None or pg_restore is None:
        pytest.skip("pg_dump/pg_restore are not installed")
    roles = roles_cluster.roles
    # The commands docs/deploy.md gives, with this server's connection options.
    assert _documented_options("pg_dump") == {"--format=custom", "--file"}
    assert _documented_options("pg_restore") == {"--dbname", "--exit-on-error"}
    dump = tmp_path / "studyq.dump"
    connection = ["--host", HOST, "--port", str(PG_PORT)]
    env = {"PGPASSWORD": roles.passwords["coordinator"], "PATH": "/usr/bin:/bin"}
    subprocess.run(
        [
            pg_dump,
            *connection,
            "--username",
            roles.login("coordinator"),
            "--dbname",
            roles_db,
            "--format=custom",
            f"--file={dump}",
        ],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    restored = roles_cluster.new_database("restored")
    subprocess.run(
        [
            pg_restore,
            *connection,
            "--username",
            "postgres",
            f"--dbname={restored}",
            "--exit-on-error",
            str(dump),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    roles_cluster.apply(restored)
    before = _snapshot(roles_db, roles)
    after = _snapshot(restored, roles)
    for part in ("relations", "columns", "default_acl", "schema", "triggers", "views"):
        assert after[part] == before[part], part
    with ResultStore.open(roles.url("analyst", restored)) as store:
        assert store.count_by_status(sweep.study_id)["success"] == 4
        assert len(list(store.iter_attempts(sweep.study_id))) == 7
    _one_run(roles, restored)
