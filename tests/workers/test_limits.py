"""The provider limiter (workers/limits.py) against a real Redis: slots as leases, their
renewal and expiry, the restart grace, the windows, and admit()/request() for a study
registered in a real SQLite store."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from _services import redis_client, redis_url

from orchestrator.contracts.runspec import RunSpec
from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare
from workers import limits
from workers.config import WorkerSettings
from workers.limits import (
    Limiter,
    LimitsUnavailable,
    NoSlot,
    RateLimited,
    admit,
    deployment_id,
    limits_url,
    request,
)
from workers.runtime import WorkerRuntime

pytestmark = pytest.mark.timeout(60)

LIMITS_DB = 11
"""A Redis database no suite uses (tests/_services.py REDIS_DBS); keys are namespaced per
test and deleted afterwards, so it is never flushed."""


@pytest.fixture
def client() -> redis.Redis:
    return redis_client(LIMITS_DB)


@pytest.fixture
def make_limiter(client: redis.Redis) -> Iterator[Callable[..., Limiter]]:
    made: list[Limiter] = []

    def build(namespace: str | None = None, **options: Any) -> Limiter:
        options.setdefault("lease_s", 5.0)
        options.setdefault("grace_s", 0.0)
        limiter = Limiter(redis_url(LIMITS_DB), namespace or uuid.uuid4().hex[:12], **options)
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        limiter._held.clear()  # its renewer thread must not put slots back
    for limiter in made:
        for key in client.scan_iter(f"{limiter.prefix}:*"):
            client.delete(key)


def test_slots_are_capped_cluster_wide_and_come_back_when_released(make_limiter):
    # Given two processes' limiters on one deployment (same namespace), cap 3
    one = make_limiter()
    other = make_limiter(namespace=one.namespace)
    # When both take slots
    taken = [one.try_slot("p", "a1", 3), one.try_slot("p", "a2", 3), other.try_slot("p", "b1", 3)]
    # Then the cap is for both together: the fourth is refused, whoever asks
    assert taken == [True, True, True]
    assert not other.try_slot("p", "b2", 3) and not one.try_slot("p", "a3", 3)
    assert one.held("p") == 3
    # And a released slot is free for the other process at once
    one.release_slot("p", "a1")
    assert other.try_slot("p", "b2", 3)
    # And another provider has slots of its own
    assert one.try_slot("q", "a1", 1)


def test_a_slot_nobody_renews_expires_after_one_lease_a_renewed_one_stays(make_limiter):
    # Given a slot held by a process whose renewer runs, and one whose process died (its
    # member was added by hand: nothing renews it)
    limiter = make_limiter(lease_s=1.0, renew_s=0.2)
    assert limiter.try_slot("p", "alive", 2)
    dead = make_limiter(lease_s=1.0)
    dead.client.zadd(limiter.keys("p")[0], {"dead": time.time() + 1.0})
    assert limiter.held("p") == 2
    # When more than one lease passes
    time.sleep(1.6)
    # Then the dead one's slot is back, the live one still holds its own
    assert limiter.held("p") == 1
    assert limiter.try_slot("p", "new", 2)
    assert not limiter.try_slot("p", "newer", 2)


def test_after_redis_lost_its_state_renewals_come_first_and_the_cap_holds(make_limiter, client):
    # Given a process holding 2 of 2 slots, renewed every 0.2 s, grace 1 s
    limiter = make_limiter(lease_s=5.0, renew_s=0.2, grace_s=1.0)
    client.set(limiter.keys("p")[1], "0")  # an old epoch: no grace now
    assert limiter.try_slot("p", "run1", 2) and limiter.try_slot("p", "run2", 2)
    # When Redis loses everything (as a restart without persistence does)
    client.delete(*limiter.keys("p"))
    # Then a newcomer gets no slot during the grace, the renewals put the held ones back
    other = make_limiter(namespace=limiter.namespace, grace_s=1.0)
    assert not other.try_slot("p", "newcomer", 2)
    time.sleep(0.5)
    assert limiter.held("p") == 2
    # And after the grace the cap still holds: the newcomer waits for a release
    time.sleep(0.8)
    assert not other.try_slot("p", "newcomer", 2)
    limiter.release_slot("p", "run1")
    assert other.try_slot("p", "newcomer", 2)


def test_acquire_waits_a_bounded_time_for_a_slot(make_limiter):
    # Given a full provider
    limiter = make_limiter()
    assert limiter.try_slot("p", "a", 1)
    # When another run asks with a 0.5 s wait
    started = time.monotonic()
    got = limiter.acquire_slot("p", "b", 1, 0.5)
    # Then it gives up after about that long
    assert not got and 0.5 <= time.monotonic() - started < 1.5


def test_requests_window_is_a_moving_minute(make_limiter):
    # Given 3 requests a minute
    limiter = make_limiter()
    # When 4 are counted without waiting
    answers = [limiter.hit("p", "requests", 3, 1, 0.0) for _ in range(4)]
    # Then the first 3 pass and the 4th is told to wait about a minute
    assert answers[:3] == [None, None, None]
    assert answers[3] is not None and 55 < answers[3] <= 61


def test_tokens_window_counts_the_estimates(make_limiter):
    # Given 1000 tokens a minute
    limiter = make_limiter()
    # When requests of 600 tokens are counted
    first = limiter.hit("p", "tokens", 1000, 600, 0.0)
    second = limiter.hit("p", "tokens", 1000, 600, 0.0)
    # Then the second does not fit, and the wait is at least the decay it needs
    assert first is None and second is not None and second >= 36


def test_request_outside_a_studyq_run_does_nothing():
    # Given no run executing
    # When an agent counts a request, then Then nothing is counted and nothing raised
    with request("sim", tokens=10**9):
        pass
    with pytest.raises(ValueError, match="tokens must be >= 0"), request("sim", tokens=-1):
        pass


def test_which_redis_and_which_deployment():
    # Given settings with a Redis broker, an AMQP broker, and an explicit limits URL
    base = {"database_url": "sqlite:///x.db"}
    redis_broker = WorkerSettings(**base, broker_url="redis://h:6379/2")
    amqp = WorkerSettings(**base, broker_url="amqp://guest:guest@h:5672//")
    explicit = WorkerSettings(**base, broker_url="amqp://h//", limits_url="redis://l:6379/3")
    # Then the limits live in the explicit URL, else a Redis broker, else nowhere
    assert limits_url(redis_broker) == "redis://h:6379/2"
    assert limits_url(amqp) is None
    assert limits_url(explicit) == "redis://l:6379/3"
    # And the deployment is the store, whatever the driver or password
    assert deployment_id("postgresql://u:one@db:5432/lab") == deployment_id(
        "postgresql+psycopg://u:two@db:5432/lab"
    )
    assert deployment_id("postgresql://db:5432/lab") != deployment_id("postgresql://db:5432/b")


# -- admit() and request() inside a run ---------------------------------------------------


def register_study(store: ResultStore, limits_section: dict[str, Any]) -> list[RunSpec]:
    payload: dict[str, Any] = {
        "study_id": f"lim-{uuid.uuid4().hex[:8]}",
        "title": "limits unit test",
        "agent_specs": ["writer", "free"],
        "problem_ids": ["noop"],
        "run_budget": {"replicates": 3},
        "bindings": {
            "agents": {"writer": "limit_agents:llm_call", "free": "limit_agents:llm_call"},
            "problems": {"noop": "workers.demo.problems:noop"},
            "providers": {"writer": "sim"},
        },
        "execution": {"limits": {"sim": limits_section}},
    }
    prepared = prepare(parse_study(payload))
    register(store, prepared)
    return list(prepared.run_specs())


@pytest.fixture
def runtime(tmp_path: Path, client: redis.Redis) -> Iterator[Callable[..., WorkerRuntime]]:
    made: list[WorkerRuntime] = []

    def build(**overrides: Any) -> WorkerRuntime:
        values: dict[str, Any] = {
            "database_url": f"sqlite:///{tmp_path / f'{uuid.uuid4().hex[:6]}.db'}",
            "limits_url": redis_url(LIMITS_DB),
            "lease_s": 5.0,
            "heartbeat_s": 1.0,
        }
        values.update(overrides)
        settings = WorkerSettings(**values)
        store = ResultStore.open(settings.database_url)
        built = WorkerRuntime(settings, worker="unit@host:1", store=store)
        made.append(built)
        return built

    yield build
    for built in made:
        prefix = f"studyq:limits:{deployment_id(built.store.engine.url)}"
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        built.store.close()


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "ADMIT_WAIT_S", 0.3)
    monkeypatch.setattr(limits, "REQUEST_WAIT_S", 0.3)
    monkeypatch.setattr(limits, "RESTART_GRACE_S", 0.0)


def writer_runs(specs: list[RunSpec]) -> list[RunSpec]:
    return [spec for spec in specs if spec.agent_key == "writer"]


def test_admit_takes_a_slot_per_run_and_refuses_past_the_cap(runtime, quick):
    # Given a study whose writer agent is bound to provider sim, max_concurrency 2
    worker = runtime()
    specs = register_study(worker.store, {"max_concurrency": 2})
    first, second, third = writer_runs(specs)
    limiter = limits.limiter_for(redis_url(LIMITS_DB), deployment_id(worker.store.engine.url), 5.0)
    # When two runs are admitted
    with admit(worker, first), admit(worker, second):
        assert limiter.held("sim") == 2
        # Then a third waits the bounded time and is refused (it goes back to the queue)
        with pytest.raises(NoSlot, match="all 2 slots busy"):
            admit(worker, third)
    # And the slots are given back when the runs end
    assert limiter.held("sim") == 0
    # And a run of an agent bound to no provider is not limited at all
    free = next(spec for spec in specs if spec.agent_key == "free")
    with admit(worker, first), admit(worker, second), admit(worker, free):
        pass


def test_one_request_per_run_is_counted_and_request_uses_it(runtime, quick):
    # Given 2 requests a minute for provider sim
    worker = runtime()
    first, second, third = writer_runs(register_study(worker.store, {"requests_per_minute": 2}))
    # When a run is admitted, and its agent calls request() once
    with admit(worker, first), request("sim"):
        pass  # uses the request counted at admission
    # And a second run's agent calls it twice
    with admit(worker, second), pytest.raises(RateLimited) as refused:
        with request("sim"):
            pass
        with request("sim"):  # the third request in the minute
            pass
    # Then the extra call is refused with a retry_after, and a third run is not admitted
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 30
    with pytest.raises(NoSlot, match="requests_per_minute"):
        admit(worker, third)


def test_tokens_above_the_window_are_refused_with_the_fix(runtime, quick):
    # Given 1000 tokens a minute
    worker = runtime()
    first, _second, _ = writer_runs(register_study(worker.store, {"tokens_per_minute": 1000}))
    with admit(worker, first):
        # When one request estimates more than the whole window
        with pytest.raises(ValueError, match="tokens_per_minute"), request("sim", tokens=5000):
            pass
        # And two of 600 are made
        with request("sim", tokens=600):
            pass
        # Then the second waits the bounded time and is rate limited
        with pytest.raises(RateLimited), request("sim", tokens=600):
            pass


def test_a_study_with_limits_on_a_worker_without_redis_is_a_clear_error(runtime, quick):
    # Given a worker whose broker is not Redis and no STUDYQ_LIMITS_URL
    worker = runtime(limits_url=None, broker_url="amqp://guest:guest@127.0.0.1:5672//")
    first = writer_runs(register_study(worker.store, {"max_concurrency": 1}))[0]
    # When a run of the study is admitted
    # Then it is refused with the setting to fix
    with pytest.raises(LimitsUnavailable, match="STUDYQ_LIMITS_URL"):
        admit(worker, first)


def test_the_first_run_of_a_deployment_waits_out_the_restart_grace_once(runtime, monkeypatch):
    # Given a deployment whose Redis has never handed out a slot (no epoch: as after a
    # restart), and a grace below the admission wait, as shipped (1.25 s < 2 s; here 0.5 s
    # < 1.5 s)
    monkeypatch.setattr(limits, "RESTART_GRACE_S", 0.5)
    monkeypatch.setattr(limits, "ADMIT_WAIT_S", 1.5)
    worker = runtime()
    first, second, _ = writer_runs(register_study(worker.store, {"max_concurrency": 2}))
    # When its first run is admitted
    started = time.monotonic()
    with admit(worker, first):
        waited = time.monotonic() - started
        # Then it waited for the grace (renewals first), then got its slot
        assert 0.4 <= waited < 1.5
        # And the next run does not wait
        started = time.monotonic()
        with admit(worker, second):
            assert time.monotonic() - started < 0.3
