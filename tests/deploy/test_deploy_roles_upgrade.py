"""Roles across upgrades, and the guards on what a worker inserts, on the real PostgreSQL.

Given roles.sql applied once (test-unique stand-ins for the three roles, see deploy_pg) and
``studyq db upgrade`` run by the coordinator, every role works without roles.sql being
applied again, also after a downgrade to 0001 and an upgrade back (the migrations own the
grants, guards and views). The worker role cannot insert evaluations, events or attempts
for a finished run, nor an attempt it did not claim, while everything the worker really does
(claim, heartbeat, finish, release, a late result) still goes through, on the one-statement
PostgreSQL paths and the portable ones alike.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from deploy_pg import Roles, RolesCluster, admin_connect, role_session
from psycopg import errors
from sqlalchemy import text

from orchestrator.cli import main as studyq_main
from orchestrator.contracts.results import RunResult, RunStatus
from orchestrator.embedded import register
from orchestrator.store import Claim, ResultStore, create_engine_for, current_revision, upgrade
from orchestrator.store import attempts as store_attempts
from orchestrator.store.schema import alembic_config, head_revision
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare

pytestmark = pytest.mark.integration

WORKER = "upgrade-w@node1:7"
ROLES_BEFORE_0003 = Path(__file__).with_name("upgrade_assets") / "roles_before_0003.sql"
VIEWS = ("analysis_runs", "analysis_evaluations", "analysis_attempts")
_ACLS = (
    "SELECT c.relname, c.relkind, pg_get_userbyid(c.relowner), c.relacl::text, "
    "(SELECT array_agg(a.attname || '=' || a.attacl::text ORDER BY a.attname) "
    " FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attacl IS NOT NULL) "
    "FROM pg_class c WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v') "
    "ORDER BY 1"
)


def _register(roles: Roles, database: str, replicates: int) -> tuple[str, list[Any]]:
    study_id = f"upg-{uuid.uuid4().hex[:8]}"
    prepared = prepare(
        parse_study(
            {
                "study_id": study_id,
                "title": "upgrade test",
                "agent_specs": ["noop"],
                "problem_ids": ["noop"],
                "run_budget": {"replicates": replicates},
            }
        )
    )
    specs = list(prepared.run_specs())
    with ResultStore.open(roles.url("coordinator", database)) as coordinator:
        register(coordinator, prepared)
        coordinator.mark_queued(study_id, [spec.index for spec in specs])
    return study_id, specs


def _result(run_id: str) -> RunResult:
    now = datetime.now(UTC)
    return RunResult(
        run_id=run_id,
        status=RunStatus.SUCCESS,
        started_at=now,
        ended_at=now,
        outputs={"design": [1.0]},
        metrics={"primary_outcome": 2.5},
        evaluations=[{"evaluator_id": "objective", "metric_name": "mass", "metric_value": 2.5}],
        events=[{"event_type": "step", "text": "done"}],
        provenance={"host": "node1", "worker": WORKER},
    )


def _upgrade_with_the_cli(roles: Roles, database: str) -> None:
    assert studyq_main(["db", "upgrade", "--db", roles.url("coordinator", database)]) == 0


def _acls(database: str) -> list[Any]:
    with admin_connect(database) as admin:
        return admin.execute(_ACLS).fetchall()


def _every_role_works(roles: Roles, database: str) -> None:
    """The coordinator registers and queues 3 runs; the worker claims, heartbeats and
    finishes them (one alone, two in one batch); the analyst reads them in every view."""
    study_id, specs = _register(roles, database, replicates=3)
    with ResultStore.open(roles.url("worker", database)) as worker:
        claims = [
            worker.claim_run(study_id, spec.index, worker=WORKER, lease_s=60) for spec in specs
        ]
        assert all(claims), "the worker role could not claim"
        assert all(worker.heartbeat(claim, 60) for claim in claims if claim)
        first, *rest = [claim for claim in claims if claim]
        assert worker.finish_run(first, _result(first.run_id))
        assert worker.finish_runs_batch([(c, _result(c.run_id)) for c in rest]) == [True, True]
    with role_session(roles, "analyst", database) as analyst:
        counts = {
            view: analyst.execute(
                f"SELECT count(*) FROM {view} WHERE study_id = %s", [study_id]
            ).fetchone()
            for view in VIEWS
        }
        statuses = analyst.execute(
            "SELECT DISTINCT status FROM analysis_runs WHERE study_id = %s", [study_id]
        ).fetchall()
    assert counts == {view: (3,) for view in VIEWS}
    assert statuses == [("success",)]


@pytest.fixture(scope="module")
def once_db(roles_cluster: RolesCluster) -> str:
    """roles.sql once, then ``studyq db upgrade`` as the coordinator; roles.sql never again."""
    database = roles_cluster.new_database("once")
    roles_cluster.apply(database)
    roles_cluster.roles.coordinator_owns_what_it_creates(database)
    _upgrade_with_the_cli(roles_cluster.roles, database)
    return database


# -- upgrades keep the roles working -----------------------------------------------------------


def test_one_upgrade_after_roles_sql_is_all_every_role_needs(roles: Roles, once_db: str) -> None:
    _every_role_works(roles, once_db)


def test_grants_are_the_same_as_with_roles_sql_applied_after_the_upgrade(
    roles_cluster: RolesCluster, roles_db: str, once_db: str
) -> None:
    """roles_db was prepared the way docs/deploy.md used to say (roles.sql, upgrade,
    roles.sql again): the upgrade alone leaves exactly the same owners and grants."""
    assert _acls(once_db) == _acls(roles_db)
    before = _acls(once_db)
    roles_cluster.apply(once_db)
    assert _acls(once_db) == before, "applying roles.sql after the upgrade changes nothing"


def test_downgrade_to_0001_and_upgrade_again_keeps_every_role_working(
    roles_cluster: RolesCluster,
) -> None:
    """Given a database with roles applied and studies in it, downgraded to 0001 (views,
    guards and spec digests gone), ``studyq db upgrade`` alone brings back every grant,
    guard and view: each role works again."""
    roles = roles_cluster.roles
    database = roles_cluster.new_database("down")
    roles_cluster.apply(database)
    roles.coordinator_owns_what_it_creates(database)
    _upgrade_with_the_cli(roles, database)
    _every_role_works(roles, database)
    granted = _acls(database)
    engine = create_engine_for(roles.url("coordinator", database))
    try:
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0001")
        assert current_revision(engine) == "0001"
        with engine.connect() as connection:
            left = connection.execute(
                text("SELECT count(*) FROM pg_views WHERE schemaname = 'public'")
            ).scalar()
            assert left == 0
    finally:
        engine.dispose()
    _upgrade_with_the_cli(roles, database)
    assert current_revision(roles.url("analyst", database)) == head_revision()
    assert _acls(database) == granted
    _every_role_works(roles, database)
    with role_session(roles, "analyst", database) as analyst:
        studies = analyst.execute("SELECT count(DISTINCT study_id) FROM analysis_runs").fetchone()
    assert studies == (2,), "the study from before the downgrade is in the views again"


def test_a_deployment_from_before_0003_upgrades_in_place(
    roles_cluster: RolesCluster, once_db: str
) -> None:
    """Given a database set up the way it was before revision 0003 (that roles.sql, upgrade
    to 0002, that roles.sql again: its own guards and views), ``studyq db upgrade`` alone
    keeps every role working and adds the insert guards; the current roles.sql then leaves
    exactly the owners and grants of a new installation."""
    roles = roles_cluster.roles
    database = roles_cluster.new_database("old")
    old_sql = re.sub(
        r"\bstudyq_(coordinator|worker|analyst)\b",
        lambda match: roles.group(match.group(1)),
        ROLES_BEFORE_0003.read_text(),
    )
    with admin_connect(database) as admin:
        admin.execute(old_sql)  # no parameters: the simple query protocol
    roles.coordinator_owns_what_it_creates(database)
    upgrade(roles.url("coordinator", database), "0002")
    with admin_connect(database) as admin:
        admin.execute(old_sql)
    _upgrade_with_the_cli(roles, database)
    _every_role_works(roles, database)
    study_id, _ = _register(roles, database, replicates=1)
    with ResultStore.open(roles.url("worker", database)) as worker:
        done = worker.claim_run(study_id, 0, worker=WORKER, lease_s=60)
        assert done is not None and worker.finish_run(done, _result(done.run_id))
    with role_session(roles, "worker", database) as session:
        _denied(session, _EVENT, [study_id, 0, 5, done.run_id, done.attempt])
    roles_cluster.apply(database)
    assert _acls(database) == _acls(once_db)


def test_an_upgrade_hands_objects_a_member_created_to_the_coordinator(
    roles_cluster: RolesCluster,
) -> None:
    """A person migrating as their own login (no ``SET role``) creates the tables as
    themselves; the upgrade's grant step hands them to the coordinator role, so the other
    coordinators and the worker guards see the usual owner."""
    roles = roles_cluster.roles
    database = roles_cluster.new_database("member")
    roles_cluster.apply(database)
    _upgrade_with_the_cli(roles, database)
    with admin_connect(database) as admin:
        owners = admin.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class "
            "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v')"
        ).fetchall()
    assert owners == [(roles.group("coordinator"),)]
    _every_role_works(roles, database)


# -- what the worker may insert ----------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(roles: Roles, once_db: str) -> dict[str, Any]:
    """One finished run (index 0, attempt 1) and one running run (index 1, attempt 1)."""
    study_id, specs = _register(roles, once_db, replicates=3)
    with ResultStore.open(roles.url("worker", once_db)) as worker:
        done = worker.claim_run(study_id, 0, worker=WORKER, lease_s=60)
        assert done is not None and worker.finish_run(done, _result(done.run_id))
        running = worker.claim_run(study_id, 1, worker=WORKER, lease_s=600)
        assert running is not None
    return {"study": study_id, "finished": done, "running": running, "specs": specs}


@pytest.fixture
def worker_session(roles: Roles, once_db: str) -> Iterator[psycopg.Connection]:
    with role_session(roles, "worker", once_db) as session:
        yield session


def _denied(session: psycopg.Connection, statement: str, params: list[Any]) -> None:
    with pytest.raises(errors.InsufficientPrivilege), session.transaction(force_rollback=True):
        session.execute(statement, params)


_EVALUATION = (
    "INSERT INTO evaluations (study_id, plan_index, seq, run_id, attempt, metric_name, "
    "metric_value, extra) VALUES (%s, %s, %s, %s, %s, 'mass', '0.001', '{}')"
)
_EVENT = (
    "INSERT INTO events (study_id, plan_index, seq, run_id, attempt, text, extra) "
    "VALUES (%s, %s, %s, %s, %s, 'forged', '{}')"
)
_ATTEMPT = (
    "INSERT INTO run_attempts (study_id, plan_index, attempt, run_id, worker, started_at, "
    "outcome) VALUES (%s, %s, %s, %s, %s, now(), %s)"
)


@pytest.mark.parametrize("statement", [_EVALUATION, _EVENT], ids=["evaluation", "event"])
def test_the_worker_cannot_add_results_to_a_finished_run(
    worker_session: psycopg.Connection, runs: dict[str, Any], statement: str
) -> None:
    done: Claim = runs["finished"]
    _denied(worker_session, statement, [done.study_id, done.index, 7, done.run_id, done.attempt])


@pytest.mark.parametrize("outcome", ["success", "running"])
def test_the_worker_cannot_add_an_attempt_to_a_finished_run(
    worker_session: psycopg.Connection, runs: dict[str, Any], outcome: str
) -> None:
    done: Claim = runs["finished"]
    _denied(
        worker_session,
        _ATTEMPT,
        [done.study_id, done.index, done.attempt + 1, done.run_id, WORKER, outcome],
    )


def test_the_worker_cannot_add_an_attempt_it_did_not_claim(
    worker_session: psycopg.Connection, runs: dict[str, Any]
) -> None:
    """A running run, claimed in an earlier transaction: no second attempt row for it, at
    its attempt or the next one; and a queued run gets one only through a claim."""
    running: Claim = runs["running"]
    for attempt in (running.attempt, running.attempt + 1):
        _denied(
            worker_session,
            _ATTEMPT,
            [running.study_id, running.index, attempt, running.run_id, WORKER, "running"],
        )
    queued = runs["specs"][2]
    _denied(worker_session, _ATTEMPT, [running.study_id, 2, 1, queued.run_id, WORKER, "running"])


def test_the_worker_cannot_add_results_under_another_attempt_or_run_id(
    worker_session: psycopg.Connection, runs: dict[str, Any]
) -> None:
    running: Claim = runs["running"]
    base = [running.study_id, running.index, 50, running.run_id, running.attempt]
    for statement in (_EVALUATION, _EVENT):
        _denied(worker_session, statement, [*base[:4], running.attempt + 1])
        _denied(worker_session, statement, [*base[:3], "run-forged", running.attempt])


def test_a_forged_value_for_a_finished_run_never_reaches_the_store(
    roles: Roles, once_db: str, runs: dict[str, Any]
) -> None:
    """What export reads: the finished run keeps its one evaluation and one event."""
    done: Claim = runs["finished"]
    with ResultStore.open(roles.url("analyst", once_db)) as store:
        evaluations = [e for e in store.iter_evaluations(done.study_id) if e.index == done.index]
        events = [e for e in store.iter_events(done.study_id) if e.index == done.index]
        attempts = [a for a in store.iter_attempts(done.study_id) if a.index == done.index]
    assert len(evaluations) == 1 and len(events) == 1
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "success")]


def test_the_portable_claim_and_finish_pass_the_guards_as_the_worker(
    roles: Roles, once_db: str
) -> None:
    """attempts.claim and attempts.finish (separate statements in one transaction, the
    path SQLite takes) as the worker role: the attempt row follows the claim's UPDATE, the
    evaluations and events follow the result's."""
    study_id, specs = _register(roles, once_db, replicates=2)
    engine = create_engine_for(roles.url("worker", once_db))
    try:
        with engine.begin() as connection:
            claims = store_attempts.claim(
                connection,
                study_id,
                [spec.index for spec in specs],
                worker=WORKER,
                lease_s=60,
                allow_planned=False,
            )
        assert len(claims) == 2
        with engine.begin() as connection:
            won = store_attempts.finish(connection, [(c, _result(c.run_id)) for c in claims])
        assert won == [True, True]
        with engine.begin() as connection:
            assert store_attempts.finish(connection, [(claims[0], _result(claims[0].run_id))]) == [
                False
            ], "a second result for a finished run writes nothing"
    finally:
        engine.dispose()
    with ResultStore.open(roles.url("analyst", once_db)) as store:
        assert store.count_by_status(study_id)["success"] == 2
        assert len(list(store.iter_evaluations(study_id))) == 2
        assert len(list(store.iter_events(study_id))) == 2


def test_a_late_result_and_a_release_pass_the_guards_as_the_worker(
    roles: Roles, once_db: str
) -> None:
    """A run whose lease expired and that reconcile requeued still takes its attempt's late
    result (nobody claimed it since: predicates.FINISH_FENCE); a released run is claimed
    again and finished."""
    study_id, _ = _register(roles, once_db, replicates=2)
    with (
        ResultStore.open(roles.url("worker", once_db)) as worker,
        ResultStore.open(roles.url("coordinator", once_db)) as coordinator,
    ):
        late = worker.claim_run(study_id, 0, worker=WORKER, lease_s=0.2)
        handed = worker.claim_run(study_id, 1, worker=WORKER, lease_s=60)
        assert late is not None and handed is not None
        time.sleep(0.4)
        assert coordinator.reconcile(study_id).requeued == 1
        assert worker.finish_run(late, _result(late.run_id))
        assert worker.release_run(handed)
        again = worker.claim_run(study_id, 1, worker=WORKER, lease_s=60)
        assert again is not None and again.attempt == 2
        assert worker.finish_run(again, _result(again.run_id))
        assert coordinator.count_by_status(study_id)["success"] == 2
        outcomes = sorted(
            (a.index, a.attempt, a.outcome) for a in coordinator.iter_attempts(study_id)
        )
    assert outcomes == [(0, 1, "success"), (1, 1, "released"), (1, 2, "success")]


def test_the_coordinator_is_not_held_to_the_worker_guards(
    roles: Roles, once_db: str, runs: dict[str, Any]
) -> None:
    """The guards apply to sessions without table-wide UPDATE on runs: the coordinator
    (owner) may correct a finished run's rows by hand."""
    done: Claim = runs["finished"]
    with (
        role_session(roles, "coordinator", once_db) as session,
        session.transaction(force_rollback=True),
    ):
        session.execute(_EVENT, [done.study_id, done.index, 9, done.run_id, done.attempt])
        session.execute(
            _ATTEMPT, [done.study_id, done.index, 2, done.run_id, "by-hand", "cancelled"]
        )
