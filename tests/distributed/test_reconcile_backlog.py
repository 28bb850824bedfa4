"""The reconcile loop's rule for queued runs nobody claimed: publish them again only when the
broker holds fewer messages for the queue than the study has queued runs.

The rule and the wait loop run against a fake transport (no services); the broker's count
(:meth:`CeleryTransport.queue_backlog`) against the real Redis.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest
import redis
from dist_services import BROKER_URL
from dist_studies import make_sweep
from sqlalchemy import update

from orchestrator import distributed, reconcile
from orchestrator.contracts.errors import BrokerUnavailableError
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings
from orchestrator.executors import celery as celery_executor
from orchestrator.executors.celery import CeleryTransport
from orchestrator.store import ResultStore
from orchestrator.store.models import RunRow
from orchestrator.store.sqltypes import db_now_plus

UNREACHED_BROKER = "redis://127.0.0.1:1/0"
"""A broker URL the fake transport never connects to."""


@dataclass
class FakeBroker:
    """What the fake transport answers and records: ``backlog`` is the answer of each
    :meth:`FakeTransport.queue_backlog` call in turn (the last one repeats; an exception is
    raised), ``published`` the plan indices of the runs published."""

    backlog: list[int | Exception] = field(default_factory=list)
    published: list[int] = field(default_factory=list)
    reads: int = 0
    delivered_within_s: float | None = None


class FakeTransport:
    """The transport as ``wait_study`` uses it, on a :class:`FakeBroker`."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker

    def __enter__(self) -> FakeTransport:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass

    def queue_backlog(self, queue: str, *, delivered_within_s: float | None = None) -> int:
        self.broker.delivered_within_s = delivered_within_s
        answers = self.broker.backlog
        answer = answers[min(self.broker.reads, len(answers) - 1)]
        self.broker.reads += 1
        if isinstance(answer, Exception):
            raise answer
        return answer

    def publish(
        self, items: Iterable[tuple[RunSpec, int, str]], *, queue: str, timeout_s: float | None
    ) -> int:
        indices = [spec.index for spec, _, _ in items]
        self.broker.published.extend(indices)
        return len(indices)


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> FakeBroker:
    """A fake broker behind every ``CeleryTransport`` the coordinator opens."""
    fake = FakeBroker()
    monkeypatch.setattr(
        celery_executor, "CeleryTransport", lambda settings, broker_url: FakeTransport(fake)
    )
    return fake


class Counts:
    """A store that only counts: ``count_by_status`` answers ``queued`` queued runs."""

    def __init__(self, queued: int) -> None:
        self.queued = queued

    def count_by_status(self, study_id: str) -> dict[str, int]:
        return {"queued": self.queued, "running": 1}


@pytest.mark.parametrize(
    ("backlog", "queued", "expected", "reads"),
    [
        ([5], 5, None, 1),  # one message per queued run: a backlog, not a loss
        ([9], 5, None, 1),  # duplicates, other studies' or running runs' messages
        ([0], 0, None, 1),  # nothing queued, nothing to look for
        ([4, 4], 5, 30.0, 2),  # short on both reads: a message was lost
        ([0, 0], 3, 30.0, 2),  # the broker restarted empty
        ([4, 5], 5, None, 2),  # short for a moment: a message was being handed to a worker
    ],
)
def test_stale_queued_runs_are_looked_for_only_when_the_broker_holds_too_few_messages(
    broker: FakeBroker,
    backlog: list[int],
    queued: int,
    expected: float | None,
    reads: int,
):
    broker.backlog = list(backlog)
    timeout = reconcile.stale_queued_timeout(
        Counts(queued),  # type: ignore[arg-type]
        FakeTransport(broker),
        "study",
        "q",
        30.0,
    )
    assert (timeout, broker.reads) == (expected, reads)
    # Deliveries older than the queued timeout (a dead worker's) do not count
    assert broker.delivered_within_s == 30.0


def test_an_unreadable_backlog_is_reported_to_the_caller(broker: FakeBroker):
    broker.backlog = [BrokerUnavailableError("down")]
    with pytest.raises(BrokerUnavailableError, match="down"):
        reconcile.stale_queued_timeout(
            Counts(3),  # type: ignore[arg-type]
            FakeTransport(broker),
            "study",
            "q",
            30.0,
        )


@pytest.fixture
def stale_sweep(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``(database URL, study id)``: an embedded store with a study of four runs, queued ten
    minutes ago and never claimed."""
    url = f"sqlite:///{tmp_path / 'studyq.db'}"
    with ResultStore.open(url) as store:
        sweep = make_sweep(store, agents=["noop"], replicates=4)
        with store.engine.begin() as connection:
            connection.execute(
                update(RunRow)
                .where(RunRow.study_id == sweep.study_id)
                .values(queued_at=db_now_plus(-600))
            )
    yield url, sweep.study_id


def wait_briefly(url: str, study_id: str, timeout_s: float = 0.0) -> distributed.WaitReport:
    """``wait_study`` for one pass (or a few, with ``timeout_s``), reconciling every 50 ms."""
    settings = Settings(
        database_url=url,
        broker_url=UNREACHED_BROKER,
        queued_timeout_s=300.0,
        reconcile_interval_s=0.05,
    )
    return distributed.wait_study(
        study_id, settings=settings, show_progress=False, timeout_s=timeout_s
    )


def test_a_backlog_the_broker_still_holds_is_not_published_again(
    broker: FakeBroker, stale_sweep: tuple[str, str]
):
    # Given four runs queued longer than the queued timeout, and a broker holding four
    # messages for the queue
    broker.backlog = [4]
    # When the coordinator reconciles
    report = wait_briefly(*stale_sweep)
    # Then nothing is published again: the runs wait behind the backlog
    assert (report.republished, broker.published) == (0, [])
    assert report.counts["queued"] == 4


def test_stale_runs_are_published_again_when_the_broker_holds_fewer_messages(
    broker: FakeBroker, stale_sweep: tuple[str, str]
):
    # Given four stale queued runs and a broker holding three messages for the queue
    broker.backlog = [3]
    # When the coordinator reconciles
    report = wait_briefly(*stale_sweep)
    # Then every stale run is published again (which one lost its message is unknown; a
    # duplicate delivery is acknowledged without running)
    assert (report.republished, sorted(broker.published)) == (4, [0, 1, 2, 3])


def test_an_unreadable_backlog_falls_back_to_publishing_stale_runs_and_says_so_once(
    broker: FakeBroker,
    stale_sweep: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
):
    # Given four stale queued runs and a broker whose backlog cannot be read
    broker.backlog = [BrokerUnavailableError("cannot count the messages: boom")]
    # When the coordinator reconciles for several passes
    report = wait_briefly(*stale_sweep, timeout_s=0.4)
    # Then the stale runs are published again once (as before the backlog rule), and the
    # fallback is reported once, not on every pass
    assert broker.reads > 1
    assert (report.republished, sorted(broker.published)) == (4, [0, 1, 2, 3])
    assert capsys.readouterr().err.count("broker backlog unknown") == 1


@pytest.mark.redis_only("plants kombu's Redis structures")
@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_backlog_counts_waiting_and_unacknowledged_messages_of_its_queue_only(
    redis_db: redis.Redis, queue: str
):
    # Given a queue with two messages waiting, one at a priority (a sub-list of its own), and
    # deliveries not acknowledged yet as kombu records them: one of this queue just now, one
    # of this queue 20 minutes ago (a worker that died holding it), one of another queue, and
    # an entry that is not kombu's
    priority_list = f"{queue}\x06\x163"
    redis_db.lpush(queue, json.dumps({"body": "a"}))
    redis_db.lpush(priority_list, json.dumps({"body": "b"}))
    now = time.time()
    deliveries = {
        f"test-{uuid.uuid4().hex}": (json.dumps([{"body": "c"}, "", routing_key]), at)
        for routing_key, at in [(queue, now), (queue, now - 1200), (f"{queue}-other", now)]
    }
    deliveries[f"test-{uuid.uuid4().hex}"] = ("not json", now)
    for tag, (entry, at) in deliveries.items():
        redis_db.zadd("unacked_index", {tag: at})
        redis_db.hset("unacked", tag, entry)
    try:
        # When the coordinator's transport counts the queue's backlog
        with CeleryTransport(Settings(), BROKER_URL) as transport:
            everything = transport.queue_backlog(queue)
            recent = transport.queue_backlog(queue, delivered_within_s=600)
            empty = transport.queue_backlog(f"{queue}-empty")
        # Then it is the two waiting plus this queue's unacknowledged deliveries, all of them
        # or those of the last 10 minutes
        assert (everything, recent, empty) == (4, 3, 0)
    finally:
        redis_db.delete(priority_list)
        redis_db.zrem("unacked_index", *deliveries)
        redis_db.hdel("unacked", *deliveries)
