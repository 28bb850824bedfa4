"""Flower without ``task-sent`` events: Celery's event state (what Flower keeps) lists every
run of a submitted sweep from the worker's own events, by its readable name.

``submit`` sends no ``task-sent`` event unless ``STUDYQ_TASK_SENT_EVENTS`` is on (publishing
is faster without); Celery's ``State`` creates a task on any ``task-*`` event and takes its
name and arguments from ``task-received``, so every run still shows up once a worker takes
it. Real ``studyq worker``, Redis and PostgreSQL; a real ``celery.events`` receiver.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _services import Broker
from dist_services import WorkerProcess
from redis import Redis

from orchestrator.contracts.settings import Settings
from orchestrator.contracts.wire import TASK_NAME, task_id_for
from orchestrator.distributed import submit_study, wait_study
from orchestrator.store import ResultStore
from orchestrator.study.model import Study, parse_study
from workers.app import create_app

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _study(queue: str, replicates: int) -> Study:
    return parse_study(
        {
            "study_id": f"events-{uuid.uuid4().hex[:10]}",
            "title": "events without task-sent",
            "agent_specs": ["noop"],
            "problem_ids": ["noop"],
            "run_budget": {"replicates": replicates},
            "factors": [{"name": "p", "levels": [{"name": "a", "value": 1},
                                                 {"name": "b", "value": 2}]}],
            "design_spec": {"kind": "full_factorial"},
            "execution": {"queue": queue},
        }
    )  # fmt: skip


class EventState:
    """A Celery event receiver feeding ``celery.events.state.State``, as Flower runs one."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.state = self.app.events.State()
        self.sent: list[str] = []
        self.connection = self.app.connection_for_read()
        self.receiver = self.app.events.Receiver(self.connection, handlers={"*": self._on_event})
        self.thread = threading.Thread(target=self._capture, daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        self.state.event(event)
        if event.get("type") == "task-sent":
            self.sent.append(str(event.get("uuid")))

    def _capture(self) -> None:
        self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self, redis_url: str) -> None:
        client = Redis.from_url(redis_url)
        before = int(client.execute_command("PUBSUB", "NUMPAT"))
        self.thread.start()
        deadline = time.monotonic() + 10
        while int(client.execute_command("PUBSUB", "NUMPAT")) <= before:
            assert time.monotonic() < deadline, "the event receiver never subscribed"
            time.sleep(0.02)

    def stop(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(5)
        self.connection.release()


@pytest.fixture
def events(live_broker: Broker, pg_url: str) -> Iterator[EventState]:
    state = EventState(Settings(database_url=pg_url, broker_url=live_broker.url))
    state.start(live_broker.url)
    try:
        yield state
    finally:
        state.stop()


@pytest.mark.redis_only("the receiver's subscription is awaited on Redis' PUBSUB NUMPAT")
def test_every_run_shows_up_from_the_workers_events_alone(
    events: EventState, pg_url: str, live_broker: Broker, tmp_path: Path
) -> None:
    queue = f"studyq-events-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(
        f"events-{uuid.uuid4().hex[:6]}", queue=queue, database_url=pg_url,
        broker_url=live_broker.url, log_dir=tmp_path, via_cli=True,
    )  # fmt: skip
    try:
        worker.wait_ready()
        # Given a sweep submitted with the default settings (no task-sent events)
        settings = Settings(database_url=pg_url, broker_url=live_broker.url,
                            reconcile_interval_s=0.2)  # fmt: skip
        assert settings.task_sent_events is False
        study = _study(queue, replicates=10)
        submit_study(study, settings=settings, show_progress=False)
        # When the worker has run it
        waited = wait_study(study.study_id, settings=settings, show_progress=False, timeout_s=40)
        assert waited.complete and waited.counts["success"] == 20
    finally:
        worker.terminate()
        live_broker.forget(queue)
    with ResultStore.open(pg_url) as store:
        ours = {
            task_id_for(run.spec, run.attempt - 1): run for run in store.iter_runs(study.study_id)
        }
    # Then the event state lists every run's task, succeeded, named and described as in the
    # message, and no task-sent event of them was sent
    deadline = time.monotonic() + 15
    while True:
        tasks = {uuid_: events.state.tasks.get(uuid_) for uuid_ in ours}
        if all(task is not None and task.state == "SUCCESS" for task in tasks.values()):
            break
        assert time.monotonic() < deadline, {k: t and t.state for k, t in tasks.items()}
        time.sleep(0.2)
    for task_id, task in tasks.items():
        assert task is not None
        assert task.name == TASK_NAME
        assert task.args.startswith(f"study={study.study_id} cond=")
        assert f"rep={ours[task_id].spec.replicate}" in task.args
        assert task.received is not None and task.sent is None
    assert not set(events.sent) & set(ours)
