"""Retries by error class under the worker role of deploy/postgres/roles.sql: the transient
ending (orchestrator/store/retries.py) is a move the guard triggers allow a worker, and an
attempt it closed stays final."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from deploy_pg import Roles

from orchestrator.contracts.results import ErrorKind, failed_result
from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.store.engine import transaction
from orchestrator.store.retries import RETRIED, requeue_transient
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare

pytestmark = pytest.mark.integration

WORKER = "slurm-a@node1:4243"


def test_the_worker_role_requeues_a_transient_failure_and_finishes_the_next_attempt(
    roles: Roles, roles_db: str
):
    # Given a queued run of a study with max_attempts 2, registered by the coordinator
    study_id = f"roles-retry-{uuid.uuid4().hex[:8]}"
    prepared = prepare(
        parse_study(
            {
                "study_id": study_id,
                "title": "roles retry",
                "agent_specs": ["noop"],
                "problem_ids": ["noop"],
                "execution": {"max_attempts": 2, "retry": {"on": ["TimeoutError"]}},
            }
        )
    )
    with ResultStore.open(roles.url("coordinator", roles_db)) as coordinator:
        register(coordinator, prepared)
        coordinator.mark_queued(study_id, [0])
    [spec] = prepared.run_specs()
    with ResultStore.open(roles.url("worker", roles_db)) as worker:
        first = worker.claim_run(study_id, 0, worker=WORKER, lease_s=60)
        assert first is not None
        failed = failed_result(
            spec,
            ErrorKind.ERROR,
            error_type="TimeoutError",
            message="provider timed out",
            started_at=datetime.now(UTC),
            worker=WORKER,
        )
        # When the worker role re-queues its transient failure
        with transaction(worker.engine) as connection:
            assert requeue_transient(connection, first, failed, 0.5)
        # Then the run is queued again and the attempt closed as retried
        row = worker.find_run(study_id, 0)
        assert row is not None and (row.status, row.attempt) == ("queued", 1)
        # And the next attempt (its last) is claimed, not re-queued, and finishes as failed
        second = worker.claim_run(study_id, 0, worker=WORKER, lease_s=60)
        assert second is not None and second.attempt == 2
        with transaction(worker.engine) as connection:
            assert not requeue_transient(connection, second, failed, 0.5)
        assert worker.finish_run(second, failed)
    with ResultStore.open(roles.url("coordinator", roles_db)) as coordinator:
        outcomes = [(a.attempt, a.outcome) for a in coordinator.iter_attempts(study_id)]
    assert outcomes == [(1, RETRIED), (2, "failed")]
