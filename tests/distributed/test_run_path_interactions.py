"""Where the run path's hooks meet (issue 12/15 review): timeouts recorded outside the result
writer still reach the budget gate, on real stores (PostgreSQL and SQLite), through the plain
run function (``workers.runtask``) and the prefork parent's hard-kill record.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import dist_agents
import pytest
from dist_studies import Sweep

from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.store.engine import transaction
from orchestrator.store.pausing import BREAKER, pause_of
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare
from workers.runtask import Outcome, record_hard_kill, run_delivery

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WAITING = {"agents": {"waiting": "dist_agents:waiting"}}
BREAKER_2 = {"window": 2, "max_failure_rate": 0.5}


def _sweep(
    store: ResultStore,
    *,
    agents: list[str],
    replicates: int,
    execution: dict[str, Any],
    bindings: dict[str, Any] | None = None,
) -> Sweep:
    """A queued study with its own ``execution`` section (a breaker, a budget, limits)."""
    study_id = f"interplay-{uuid.uuid4().hex[:10]}"
    payload: dict[str, Any] = {
        "study_id": study_id,
        "title": "run path interactions",
        "agent_specs": agents,
        "problem_ids": ["noop"],
        "run_budget": {"replicates": replicates},
        "execution": execution,
    }
    if bindings:
        payload["bindings"] = bindings
    prepared = prepare(parse_study(payload))
    register(store, prepared)
    specs = list(prepared.run_specs())
    store.mark_queued(study_id, [spec.index for spec in specs])
    return Sweep(study_id, specs)


def _paused(store: ResultStore, study_id: str) -> str | None:
    with transaction(store.engine, readonly=True) as connection:
        found = pause_of(connection, study_id)
    return None if found is None else found.reason


def _wait_until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_hard_killed_runs_trip_the_breaker(store: ResultStore, runtime_for):
    # Given a study with a breaker over its last 2 runs, both claimed by a prefork child
    study = _sweep(store, agents=["noop"], replicates=3, execution={"breaker": BREAKER_2})
    child = "pair@host:4242"
    for index in (0, 1):
        assert store.claim_run(study.study_id, index, worker=child, lease_s=60) is not None
    runtime = runtime_for(store, worker="pair@host:4241")
    # When the prefork parent records both as killed at their hard time limit
    for index in (0, 1):
        assert record_hard_kill(runtime, study.specs[index].to_message(), child, 3.0) is True
    # Then the breaker saw both timeouts: the study is paused and its third run is not claimed
    assert _paused(store, study.study_id) == BREAKER
    assert run_delivery(runtime, study.specs[2].to_message(), 0) is Outcome.DUPLICATE
    third = store.find_run(study.study_id, 2)
    assert third is not None and third.status == "queued"


def test_runs_abandoned_on_a_thread_at_their_hard_limit_trip_the_breaker(
    store: ResultStore, runtime_for
):
    # Given a breaker study whose runs hang on threads (the threads pool) past 0.3 s + 1 s
    study = _sweep(
        store,
        agents=["waiting"],
        replicates=3,
        execution={"breaker": BREAKER_2, "timeout_s": 0.3},
        bindings=WAITING,
    )
    runtime = runtime_for(store, time_limit_grace_s=1.0)
    boxes: list[list[Outcome]] = []
    threads = []
    for index in (0, 1):
        box: list[Outcome] = []
        thread = threading.Thread(
            target=lambda i=index, b=box: b.append(
                run_delivery(runtime, study.specs[i].to_message(), 0)
            ),
            daemon=True,
        )
        thread.start()
        threads.append(thread)
        boxes.append(box)
    # When their supervisors record both as timeouts (the agents still hang)
    _wait_until(
        lambda: all(
            (store.find_run(study.study_id, i) or pytest.fail("no run")).status == "failed"
            for i in (0, 1)
        )
    )
    # Then the breaker saw them without waiting for the hung agents: the study is paused
    try:
        _wait_until(lambda: _paused(store, study.study_id) is not None, timeout=3.0)
        assert _paused(store, study.study_id) == BREAKER
    finally:
        dist_agents.gate.set()
        for thread in threads:
            thread.join(10)
    assert boxes == [[Outcome.TIMED_OUT], [Outcome.TIMED_OUT]]
