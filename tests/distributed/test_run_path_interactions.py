"""Where the run path's hooks meet (issue 12/15 review), on real stores (PostgreSQL and
SQLite) and a real Redis for the provider limits, through the plain run function
(``workers.runtask``) and the prefork parent's hard-kill record:

* timeouts recorded outside the result writer still reach the budget gate (breaker);
* a warm shutdown while a claimed run waits for a provider slot hands the run back
  (attempt refunded, slot freed) instead of executing it, or leaving it ``running``;
* evidence where the hooks already agree: a retried attempt is no failure (Celery, breaker)
  and the last one fails once; a run with no slot in time is handed back uncharged and no
  failure; a delivery of a paused study (a retry's included) is acknowledged unexecuted and
  runs after the resume.

Tests that signal the main thread use pytest-timeout's thread method.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dist_agents
import pytest
import redis
from _services import redis_client, redis_url
from dist_services import PG_PORT, TcpLink
from dist_studies import Sweep
from publishing import publish_runs

from orchestrator.embedded import register
from orchestrator.store import ResultStore, create_engine_for
from orchestrator.store.engine import transaction
from orchestrator.store.pausing import BREAKER, pause, pause_of, unpause
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare
from workers import limits
from workers.failures import RunFailed
from workers.limits import Limiter, deployment_id
from workers.runtask import Outcome, record_hard_kill, run_delivery
from workers.tasks import _run_failed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

WAITING = {"agents": {"waiting": "dist_agents:waiting"}}
BREAKER_2 = {"window": 2, "max_failure_rate": 0.5}
BREAKER_1 = {"window": 1, "max_failure_rate": 0.5}
LIMITS_DB = 11
"""The provider limits' Redis database of tests/workers/test_limits.py: keys are namespaced
per deployment and provider (a provider name of each test's own) and deleted afterwards."""


def _sweep(
    store: ResultStore,
    *,
    agents: list[str],
    replicates: int,
    execution: dict[str, Any],
    bindings: dict[str, Any] | None = None,
    factors: dict[str, Any] | None = None,
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
    if factors:
        payload["factors"] = [
            {"name": name, "kind": "manipulated", "levels": [{"name": "x", "value": value}]}
            for name, value in factors.items()
        ]
        payload["design_spec"] = {"kind": "full_factorial"}
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


def test_a_retried_attempt_is_no_failure_and_the_last_one_fails_once(
    store: ResultStore, runtime_for, tmp_path
):
    # Given a run that always raises TimeoutError, transient for its study (2 attempts), and
    # a breaker that trips at the first failed run
    study = _sweep(
        store,
        agents=["timeouts"],
        replicates=1,
        execution={
            "retry": {"on": ["TimeoutError"], "backoff_s": 0.01},
            "max_attempts": 2,
            "breaker": BREAKER_1,
        },
        bindings={"agents": {"timeouts": "retry_agents:always_timeout"}},
        factors={"journal": str(tmp_path)},
    )
    runtime = runtime_for(store)
    message = study.specs[0].to_message()
    # When its first attempt is delivered
    first = run_delivery(runtime, message, 0)
    # Then it is re-queued, no failure for Celery and none for the breaker
    assert first is Outcome.RETRYING
    assert _run_failed(first, message) is None
    assert _paused(store, study.study_id) is None
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.attempts_used) == ("queued", 1)
    # When its second (last) attempt is delivered
    last = run_delivery(runtime, message, 1)
    # Then it fails once with its own error, and only now the breaker counts it
    assert last is Outcome.FAILED
    failure = _run_failed(last, message)
    assert isinstance(failure, RunFailed) and failure.error_type == "TimeoutError"
    # (the note was taken: a later outcome on this thread never reuses its error)
    again = _run_failed(last, message)
    assert again is not None and again.error_type == "RunFailed"
    assert _run_failed(Outcome.SUCCESS, message) is None
    assert _paused(store, study.study_id) == BREAKER
    assert [a.outcome for a in store.iter_attempts(study.study_id)] == ["retried", "failed"]


# -- a warm shutdown while a claimed run waits for a provider slot --------------------------


@pytest.fixture
def limited(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Sweep, str, Limiter]]:
    """A one-run study whose agent's provider allows one run at a time, and a limiter of
    another process holding that slot (released by the test)."""
    monkeypatch.setattr(limits, "ADMIT_WAIT_S", 5.0)
    monkeypatch.setattr(limits, "RESTART_GRACE_S", 0.0)
    provider = f"sim-{uuid.uuid4().hex[:8]}"
    study = _sweep(
        store,
        agents=["noop"],
        replicates=1,
        execution={"limits": {provider: {"max_concurrency": 1}}, "breaker": BREAKER_1},
        bindings={"providers": {"noop": provider}},
    )
    namespace = deployment_id(store.engine.url)
    holder = Limiter(redis_url(LIMITS_DB), namespace, lease_s=30.0, grace_s=0.0)
    assert holder.try_slot(provider, "another-worker", 1)
    yield study, provider, holder
    client: redis.Redis = redis_client(LIMITS_DB)
    for key in holder.keys(provider):
        client.delete(key)


def _waiting_for_a_slot(store: ResultStore, study: Sweep) -> None:
    _wait_until(lambda: (store.find_run(study.study_id, 0) or pytest.fail("")).status == "running")
    time.sleep(0.2)  # claimed, now in the admission wait


def test_a_run_admitted_after_a_warm_shutdown_is_handed_back_not_executed(
    store: ResultStore, runtime_for, limited
):
    # Given a claimed run waiting for its provider's only slot, on a thread (threads pool)
    study, provider, holder = limited
    runtime = runtime_for(store, limits_url=redis_url(LIMITS_DB))
    box: list[Outcome] = []
    thread = threading.Thread(
        target=lambda: box.append(run_delivery(runtime, study.specs[0].to_message(), 0)),
        daemon=True,
    )
    thread.start()
    _waiting_for_a_slot(store, study)
    # When the shutdown grace ends (runs handed back) and then the slot comes free
    runtime.hand_back_all()
    holder.release_slot(provider, "another-worker")
    thread.join(15)
    # Then the run is handed back, not executed: queued, attempt refunded, slot free again
    assert box == [Outcome.HANDED_BACK]
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.attempts_used) == ("queued", 0)
    assert holder.held(provider) == 0


@pytest.mark.timeout(60, method="thread")
def test_a_sigterm_while_waiting_for_a_slot_hands_the_claim_back(
    store: ResultStore, runtime_for, limited
):
    # Given a claimed run waiting for its provider's only slot on the main thread (a prefork
    # child), whose SIGTERM raises SystemExit as a prefork child's does
    study, _provider, _holder = limited
    runtime = runtime_for(store, limits_url=redis_url(LIMITS_DB))

    def terminate(_signum: int, _frame: Any) -> None:
        raise SystemExit(1)

    previous = signal.signal(signal.SIGUSR1, terminate)
    try:
        timer = threading.Timer(1.0, os.kill, args=(os.getpid(), signal.SIGUSR1))
        timer.start()
        # When the process is told to stop during the admission wait
        with pytest.raises(SystemExit):
            run_delivery(runtime, study.specs[0].to_message(), 0)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # Then its claim was given back uncharged (not left running until its lease expires)
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.attempts_used) == ("queued", 0)


def test_a_run_with_no_slot_in_time_is_handed_back_uncharged_and_no_failure(
    store: ResultStore, runtime_for, limited, monkeypatch: pytest.MonkeyPatch
):
    # Given a claimed run of a breaker study whose provider's only slot stays taken
    study, provider, holder = limited
    monkeypatch.setattr(limits, "ADMIT_WAIT_S", 0.3)
    runtime = runtime_for(store, limits_url=redis_url(LIMITS_DB))
    message = study.specs[0].to_message()
    # When it is delivered
    outcome = run_delivery(runtime, message, 0)
    # Then it goes back to the queue (Reject requeue), its attempt refunded, nothing held,
    # and it is no failure: not for Celery, not for the breaker
    assert outcome is Outcome.HANDED_BACK
    assert _run_failed(outcome, message) is None
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.attempts_used) == ("queued", 0)
    assert holder.held(provider) == 1  # only the other worker's
    assert _paused(store, study.study_id) is None
    assert [a.outcome for a in store.iter_attempts(study.study_id)] == ["released"]


def test_a_delivery_of_a_paused_study_is_acknowledged_unexecuted(
    store: ResultStore, runtime_for, caplog: pytest.LogCaptureFixture
):
    # Given a study paused by its breaker, with a queued run
    study = _sweep(store, agents=["noop"], replicates=1, execution={"breaker": BREAKER_1})
    with transaction(store.engine) as connection:
        assert pause(connection, study.study_id, BREAKER, {"failed": 1, "window": 1})
    runtime = runtime_for(store)
    message = study.specs[0].to_message()
    # When its run is delivered (a retry's timer, or a message published before the pause)
    with caplog.at_level(logging.INFO, logger="studyq.worker"):
        outcome = run_delivery(runtime, message, 0)
    # Then nothing is claimed or executed; the task returns 'duplicate' (acknowledged), one
    # INFO line, no failure; the run stays queued for the resume to publish again
    assert outcome is Outcome.DUPLICATE
    assert _run_failed(outcome, message) is None
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.attempts_used) == ("queued", 0)
    # (the limits keeper of an earlier test's runtime may log on its own thread meanwhile)
    lines = [r for r in caplog.records if r.name == "studyq.worker" and r.module != "limits"]
    assert [r.levelno for r in lines] == [logging.INFO]
    assert "not claimable" in lines[0].getMessage()


def test_a_retry_of_a_paused_study_waits_for_the_resume(store: ResultStore, runtime_for, tmp_path):
    # Given a run re-queued for a transient error, then its study paused (its budget, say)
    study = _sweep(
        store,
        agents=["timeouts"],
        replicates=1,
        execution={"retry": {"on": ["TimeoutError"], "backoff_s": 0.01}, "max_attempts": 2},
        bindings={"agents": {"timeouts": "retry_agents:always_timeout"}},
        factors={"journal": str(tmp_path)},
    )
    runtime = runtime_for(store)
    message = study.specs[0].to_message()
    assert run_delivery(runtime, message, 0) is Outcome.RETRYING
    with transaction(store.engine) as connection:
        assert pause(connection, study.study_id, "budget", {"reached": ["max_cost_usd"]})
    # When the retry's message (published for the retried attempt) is delivered
    outcome = run_delivery(runtime, message, 1)
    # Then it is acknowledged unexecuted (not refused as a mismatch), the run still queued
    # with its attempt left; after the resume the same message runs the last attempt
    assert outcome is Outcome.DUPLICATE
    run = store.find_run(study.study_id, 0)
    assert run is not None and (run.status, run.attempts_used) == ("queued", 1)
    with transaction(store.engine) as connection:
        assert unpause(connection, study.study_id) is not None
    assert run_delivery(runtime, message, 1) is Outcome.FAILED
    assert [a.outcome for a in store.iter_attempts(study.study_id)] == ["retried", "failed"]


def test_a_hard_kill_gives_the_killed_childs_provider_slot_back(
    store: ResultStore, runtime_for, limited
):
    # Given a run whose prefork child took its provider's only slot and was then killed at
    # the hard time limit (its slot is no longer renewed, nor released)
    study, provider, holder = limited
    holder.release_slot(provider, "another-worker")
    child = "pair@host:4242"
    spec = study.specs[0]
    assert store.claim_run(study.study_id, 0, worker=child, lease_s=60) is not None
    slots = holder.keys(provider)[0]
    redis_client(LIMITS_DB).zadd(slots, {f"{child}/{spec.run_id}/1": time.time() + 30})
    assert holder.held(provider) == 1
    runtime = runtime_for(store, worker="pair@host:4241", limits_url=redis_url(LIMITS_DB))
    # When the parent records the kill
    assert record_hard_kill(runtime, spec.to_message(), child, 3.0) is True
    # Then the slot is free at once, not a lease later
    assert holder.held(provider) == 0


@pytest.mark.timeout(60, method="thread")
def test_a_failed_run_during_an_outage_is_recorded_not_requeued(pg_store: ResultStore, runtime_for):
    # Given a worker that reaches PostgreSQL through a link we can cut, retrying each store
    # call for 1 s, and a run that fails while the database is away until the policy read
    # has given up (the link comes back when the worker logs that; a timed outage raced the
    # read's and the write's retry budgets on a loaded machine)
    link = TcpLink(PG_PORT)
    gave_up = _RestoreOnRecord(link, "could not load the retry policy")
    backstop = threading.Timer(10.0, link.restore)
    logging.getLogger("studyq.worker").addHandler(gave_up)
    url = pg_store.engine.url.set(port=link.port).render_as_string(hide_password=False)
    worker_store = ResultStore(create_engine_for(url))
    try:
        study = _sweep(
            pg_store,
            agents=["counting"],
            replicates=1,
            execution={},
            bindings={"agents": {"counting": "dist_agents:counting"}},
        )
        runtime = runtime_for(worker_store, result_retry_s=1.0)

        def outage_then_fail() -> None:
            link.cut()
            backstop.start()  # restores the link only if the read never gives up
            raise ValueError("bad prompt template")

        dist_agents.during.append(outage_then_fail)
        # When the run fails and its error is classified (is it transient for its study?)
        outcome = run_delivery(runtime, study.specs[0].to_message(), 0)
        # Then the classification's store read failing does not drop the executed run's
        # result (the task would requeue its message as if nothing ran): it is written
        assert gave_up.seen, "the policy read did not fail during the outage"
        assert outcome is Outcome.FAILED
        assert dist_agents.calls == [study.specs[0].seed]
        run = pg_store.find_run(study.study_id, 0)
        assert run is not None and (run.status, run.error_type) == ("failed", "ValueError")
    finally:
        logging.getLogger("studyq.worker").removeHandler(gave_up)
        backstop.cancel()
        worker_store.close()
        link.close()


class _RestoreOnRecord(logging.Handler):
    """Restores ``link`` when a log record containing ``text`` is emitted."""

    def __init__(self, link: TcpLink, text: str) -> None:
        super().__init__()
        self.link = link
        self.text = text
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen = True
            self.link.restore()


@pytest.mark.timeout(90)
@pytest.mark.redis_only("the provider limits live in the Redis broker")
def test_a_real_prefork_hard_kill_frees_the_provider_slot_at_once(
    worker_pair: Any, pg_store: ResultStore, publisher: Any, live_broker: Any, pg_url: str
):
    # Given a run of a study whose provider allows one run at a time, hung in C code (only
    # killing its prefork child stops it, and that child neither renews nor releases its slot)
    provider = f"sim-{uuid.uuid4().hex[:8]}"
    study = _sweep(
        pg_store,
        agents=["hung"],
        replicates=1,
        execution={"timeout_s": 1, "limits": {provider: {"max_concurrency": 1}}},
        bindings={"agents": {"hung": "dist_agents:hung_in_c"}, "providers": {"hung": provider}},
    )
    watcher = Limiter(live_broker.url, deployment_id(pg_url), lease_s=60.0, grace_s=0.0)
    try:
        # When it is published and killed at its hard limit (1 s + 1 s of grace)
        publish_runs(publisher, study.publishable(), queue=worker_pair.queue, time_limit_s=1)
        _wait_until(
            lambda: (pg_store.find_run(study.study_id, 0) or pytest.fail("")).status == "failed",
            timeout=30,
        )
        # Then the worker's main process gave the killed child's slot back, not a lease later
        _wait_until(lambda: watcher.held(provider) == 0, timeout=3.0)
    finally:
        for key in watcher.keys(provider):
            watcher.client.delete(key)
