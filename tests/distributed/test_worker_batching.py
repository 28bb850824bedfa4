"""A worker process's claim batching (``workers.claims``) and write-behind results
(``workers.writer``), on real stores: concurrent callers share statements, nobody gets a run
twice, and every result handed in is written, refused or reported, never dropped."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from dist_studies import make_sweep

from orchestrator.contracts.errors import StoreUnavailableError
from orchestrator.contracts.results import RunResult, RunStatus
from orchestrator.store import Claim, ResultStore, create_engine_for
from workers.claims import ClaimBatcher
from workers.runtask import Outcome, run_delivery
from workers.writer import ResultWriter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _count_claim_calls(store: ResultStore) -> list[int]:
    """Record the size of every ``claim_runs`` call (one statement each)."""
    sizes: list[int] = []
    claim_runs = store.claim_runs

    def counted(study_id: str, indices: Any, **options: Any) -> Any:
        sizes.append(len(indices))
        return claim_runs(study_id, indices, **options)

    store.claim_runs = counted  # type: ignore[method-assign]
    return sizes


def _result(claim: Claim, status: RunStatus = RunStatus.SUCCESS, **extra: Any) -> RunResult:
    now = datetime.now(UTC)
    return RunResult(run_id=claim.run_id, status=status, started_at=now, ended_at=now, **extra)


def test_concurrent_claims_share_statements_and_each_run_is_claimed_once(store: ResultStore):
    # Given 40 queued runs and a batcher that 40 threads (one per run, plus a duplicate
    # delivery for every fourth run) use at once
    sweep = make_sweep(store, agents=["noop"], replicates=40)
    batcher = ClaimBatcher(store, worker="w@h:1", lease_s=60)
    calls = _count_claim_calls(store)
    indices = [spec.index for spec in sweep.specs] + [s.index for s in sweep.specs[::4]]
    start = threading.Barrier(len(indices))
    won: list[Claim | None] = [None] * len(indices)

    def claim(slot: int) -> None:
        start.wait()
        spec = sweep.specs[indices[slot]]
        won[slot] = batcher.claim(sweep.study_id, spec.index, spec.digest(), 0)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(indices))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then every run was claimed exactly once (the duplicate deliveries got nothing)
    claimed = Counter(c.index for c in won if c is not None)
    assert sorted(claimed) == [spec.index for spec in sweep.specs]
    assert set(claimed.values()) == {1}
    assert sum(c is None for c in won) == len(sweep.specs[::4])
    assert store.count_by_status(sweep.study_id)["running"] == 40
    # ...in fewer statements than callers: concurrent callers were claimed together
    assert sum(calls) <= len(indices)  # a duplicate in the same statement is asked once
    assert 1 <= len(calls) < len(indices)


def test_a_claim_that_fails_reaches_every_caller_of_its_statement(store: ResultStore):
    # Given a batcher whose store is closed and points nowhere
    sweep = make_sweep(store, agents=["noop"])
    broken = ResultStore(
        create_engine_for("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")
    )
    batcher = ClaimBatcher(broken, worker="w@h:1", lease_s=60)
    # Then the caller gets the store's error, and the batcher is usable again afterwards
    digest = sweep.specs[0].digest()
    with pytest.raises(StoreUnavailableError):
        batcher.claim(sweep.study_id, 0, digest, 0)
    with pytest.raises(StoreUnavailableError):
        batcher.claim(sweep.study_id, 0, digest, 0)


def test_a_forged_copy_beside_the_genuine_message_cannot_take_its_claim(store: ResultStore):
    # Given 20 runs, each delivered twice at the same moment: a forged copy (another seed,
    # so another digest) that arrives first, and the genuine message
    sweep = make_sweep(store, agents=["noop"], replicates=20)
    batcher = ClaimBatcher(store, worker="w@h:1", lease_s=60)
    calls = _count_claim_calls(store)
    forged = {spec.index: replace(spec, seed=spec.seed + 1).digest() for spec in sweep.specs}
    deliveries = [(s.index, forged[s.index]) for s in sweep.specs]
    deliveries += [(s.index, s.digest()) for s in sweep.specs]
    start = threading.Barrier(len(deliveries))
    won: dict[tuple[int, str], Claim | None] = {}

    def claim(index: int, digest: str) -> None:
        start.wait()
        won[index, digest] = batcher.claim(sweep.study_id, index, digest, 0)

    threads = [threading.Thread(target=claim, args=d) for d in deliveries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # Then every genuine message won its run and no forged copy won anything
    assert all(won[s.index, s.digest()] is not None for s in sweep.specs)
    assert all(won[index, digest] is None for index, digest in forged.items())
    assert store.count_by_status(sweep.study_id)["running"] == 20
    assert 1 <= len(calls) < len(deliveries)


def test_a_message_published_for_a_later_attempt_claims_nothing(store: ResultStore):
    # Given a queued run that has had no claim yet
    sweep = make_sweep(store, agents=["noop"])
    spec = sweep.specs[0]
    batcher = ClaimBatcher(store, worker="w@h:1", lease_s=60)
    # When a message for attempt 3 arrives, then one for attempt 0
    ahead = batcher.claim(sweep.study_id, spec.index, spec.digest(), 3)
    current = batcher.claim(sweep.study_id, spec.index, spec.digest(), 0)
    # Then only the current one claims the run
    assert ahead is None
    assert current is not None and current.attempt == 1


def test_the_writer_writes_everything_handed_in_and_drain_waits_for_it(store: ResultStore):
    # Given 30 claimed runs whose results are handed to the writer from several threads
    sweep = make_sweep(store, agents=["noop"], replicates=30)
    claims = store.claim_runs(
        sweep.study_id, [s.index for s in sweep.specs], worker="w", lease_s=60
    )
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def count(what: str) -> int:
        with lock:
            counts[what] += 1
            return counts[what]

    writer = ResultWriter(store, retry_s=5.0, count=count)
    threads = [
        threading.Thread(target=writer.submit, args=(claim, _result(claim))) for claim in claims
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # When the writer is drained
    assert writer.drain(timeout_s=20) is True
    # Then every result is in the store and counted, nothing is pending
    assert writer.pending == 0
    assert store.count_by_status(sweep.study_id)["success"] == 30
    assert counts == {"success": 30}


def test_a_refused_result_is_counted_and_does_not_block_the_others(
    store: ResultStore, caplog: pytest.LogCaptureFixture
):
    # Given two claims, one of them stale (the run was released and claimed again since)
    sweep = make_sweep(store, agents=["noop"], replicates=2)
    first, second = store.claim_runs(sweep.study_id, [0, 1], worker="w", lease_s=60)
    assert store.release_run(first)
    store.claim_run(sweep.study_id, 0, worker="other", lease_s=60)
    counts: Counter[str] = Counter()
    writer = ResultWriter(store, retry_s=5.0, count=lambda what: counts.update([what]) or 0)
    # When both results are written in one batch
    with caplog.at_level(logging.WARNING, logger="studyq.worker"):
        outcomes = writer.write([(first, _result(first)), (second, _result(second))])
    # Then the stale one is refused (and logged), the other recorded
    assert outcomes == ["refused", "success"]
    assert counts == {"refused": 1, "success": 1}
    assert "refused" in caplog.text
    run = store.find_run(sweep.study_id, 0)
    assert run is not None and (run.status, run.lease_owner) == ("running", "other")


def test_a_delivery_under_write_behind_returns_before_its_result_is_written(
    store: ResultStore, runtime_for
):
    # Given a runtime that writes results behind the run, as the Celery worker's does
    sweep = make_sweep(store, agents=["noop"], replicates=5)
    runtime = runtime_for(store)
    runtime.write_behind = True
    # When five runs are delivered
    outcomes = [run_delivery(runtime, spec.to_message(), 0) for spec in sweep.specs]
    # Then each returns its run's own outcome, and after the drain every result is stored
    assert outcomes == [Outcome.SUCCESS] * 5
    assert runtime.drain() is True
    assert store.count_by_status(sweep.study_id)["success"] == 5
    assert runtime.counters["success"] == 5
