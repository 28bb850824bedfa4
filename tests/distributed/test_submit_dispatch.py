"""What ``submit`` publishes, by how the study got to the store: a study it has just
registered is queued page by page from its plan; one registered before (a submit that died
after registering, or one with runs left) gets exactly its planned runs from the store.
Real PostgreSQL and broker; no worker (the messages stay in the queue)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from _services import Broker

from orchestrator.contracts.settings import Settings
from orchestrator.distributed import submit_study
from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.study.model import Study, parse_study
from orchestrator.study.plan import prepare

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _study(queue: str) -> Study:
    return parse_study(
        {
            "study_id": f"dispatch-{uuid.uuid4().hex[:10]}",
            "title": "dispatch",
            "agent_specs": ["noop"],
            "problem_ids": ["noop"],
            "run_budget": {"replicates": 7},
            "factors": [{"name": "p", "levels": [{"name": "a", "value": 1},
                                                 {"name": "b", "value": 2}]}],
            "design_spec": {"kind": "full_factorial"},
            "execution": {"queue": queue},
        }
    )  # fmt: skip


@pytest.fixture
def queue(live_broker: Broker) -> Iterator[str]:
    name = f"studyq-dispatch-{uuid.uuid4().hex[:8]}"
    yield name
    live_broker.forget(name)


def test_a_new_study_publishes_every_run_once_and_a_second_submit_none(
    pg_url: str, live_broker: Broker, queue: str
) -> None:
    settings = Settings(database_url=pg_url, broker_url=live_broker.url, publish_batch=4)
    study = _study(queue)
    # When a study is submitted for the first time, then again
    first = submit_study(study, settings=settings, show_progress=False)
    again = submit_study(study, settings=settings, show_progress=False)
    # Then the first submit registered and published all 14 runs, the second nothing
    assert (first.created, first.planned, first.published) == (True, 14, 14)
    assert (again.created, again.published) == (False, 0)
    assert live_broker.waiting(queue) == 14
    with ResultStore.open(pg_url) as store:
        assert store.count_by_status(study.study_id)["queued"] == 14


def test_a_study_registered_before_publishes_its_planned_runs_from_the_store(
    pg_url: str, live_broker: Broker, queue: str
) -> None:
    settings = Settings(database_url=pg_url, broker_url=live_broker.url, publish_batch=4)
    study = _study(queue)
    # Given a study registered, with 5 of its runs already queued (a submit that died)
    with ResultStore.open(pg_url) as store:
        register(store, prepare(study))
        assert store.mark_queued(study.study_id, [0, 3, 6, 9, 12]) == 5
    # When it is submitted
    report = submit_study(study, settings=settings, show_progress=False)
    # Then exactly the 9 runs still planned are published
    assert (report.created, report.published) == (False, 9)
    assert live_broker.waiting(queue) == 9
    with ResultStore.open(pg_url) as store:
        assert store.count_by_status(study.study_id)["queued"] == 14
