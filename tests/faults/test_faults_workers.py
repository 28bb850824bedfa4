"""Workers that die, vanish or freeze mid-sweep: real ``celery worker`` processes (prefork,
two slots each) on the shared Redis and PostgreSQL, killed with real signals.

Every test ends with the audit (fault_audit.py): no lost run, no duplicate row, attempts
within ``max_attempts``, artifacts equal to the fault-free run's.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable

import pytest
from fault_bed import Bed
from fault_services import wait_until
from fault_study import BIG_SWEEP, LONG_SWEEP
from sqlalchemy import text

from orchestrator.store import create_engine_for

pytestmark = [pytest.mark.integration]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_1000_run_sweep_on_two_workers_runs_every_run_exactly_once(make_bed):
    # Given 1,000 short runs and two workers
    bed = make_bed(shape=BIG_SWEEP)
    workers = bed.workers.start(2)
    # When the study is submitted and waited for
    submitted = bed.submit()
    report = bed.wait(timeout_s=100)
    # Then every run succeeded exactly once, both workers took part, the agent ran once per
    # run, and the artifacts are the embedded run's (timestamps, latencies, workers aside)
    assert submitted.published == 1000
    assert report.complete and report.counts["success"] == 1000
    assert (report.requeued, report.failed_lost) == (0, 0)
    audit = bed.audit()
    assert set(audit.attempts_per_run.values()) == {1}
    assert Counter(Counter(bed.calls()).values()) == {1: 1000}
    nodes = {a.worker.rsplit(":", 1)[0] for a in bed.store.iter_attempts(bed.study_id)}
    assert nodes == {worker.nodename for worker in workers}


@pytest.mark.timeout(150)
def test_pool_children_and_whole_workers_killed_three_times_lose_nothing(
    make_bed: Callable[..., Bed],
):
    # Given a sweep running on two workers
    bed = make_bed(shape=LONG_SWEEP)
    first, second = bed.workers.start(2)
    bed.submit()
    coordinator = bed.wait_in_background(timeout_s=120)
    bed.wait_for_successes(10)
    # When, three times, a pool child is killed mid-run and then its whole worker, and a
    # replacement worker is started each time
    killed: list[int] = []
    victims = [first, second]
    for round_ in range(3):
        victim = victims[round_]
        killed.append(bed.kill_pool_child_mid_run(victim))
        killed.extend(bed.kill_worker_mid_run(victim))
        (replacement,) = bed.workers.start(1, wait=False)
        victims.append(replacement)
        if round_ == 1:
            replacement.wait_ready()
    # Then the sweep completes, every killed run was re-queued when its lease expired and
    # succeeded on a later attempt, and the audit passes
    coordinator["thread"].join(130)
    assert "error" not in coordinator, coordinator.get("error")
    report = coordinator["report"]
    assert report.complete, (report.counts, bed.workers.tail())
    assert not bed.counts()["running"]
    assert len(killed) >= 6, killed
    for index in set(killed):
        history = bed.attempts_of(index)
        assert history[0][2] == "lost" and history[-1][2] == "success", history
    assert report.requeued >= len(set(killed))
    bed.audit()


@pytest.mark.timeout(120)
def test_all_workers_killed_and_replaced_lose_nothing(bed: Bed):
    # Given a sweep running on two workers
    old = bed.workers.start(2)
    bed.submit()
    coordinator = bed.wait_in_background(timeout_s=100)
    bed.wait_for_successes(bed.shape.runs // 4)
    # When both workers are killed mid-run (SIGKILL to each process group) and two new ones
    # are started
    wait_until(lambda: all(bed.running_on(worker)() for worker in old), 20, "both busy")
    in_flight = bed.kill_workers(old)
    done_at_kill = bed.counts()["success"]
    new = bed.workers.start(2)
    # Then the new workers finish the sweep, the runs in flight come back after their lease,
    # and the audit passes
    coordinator["thread"].join(110)
    assert "error" not in coordinator, coordinator.get("error")
    assert coordinator["report"].complete, bed.workers.tail()
    assert in_flight and done_at_kill < bed.shape.runs
    for index in in_flight:
        history = bed.attempts_of(index)
        assert history[0][2] == "lost" and history[-1][2] == "success", history
        assert any(new_worker.owns(history[-1][1]) for new_worker in new), history
    bed.audit()


@pytest.mark.timeout(120)
def test_a_worker_frozen_past_its_lease_has_its_late_write_refused(bed: Bed):
    # Given a sweep running on two workers
    frozen, other = bed.workers.start(2)
    bed.submit()
    coordinator = bed.wait_in_background(timeout_s=100)
    bed.wait_for_successes(20)

    # When one worker (main process and pool children) is stopped with SIGSTOP mid-run, stays
    # stopped until another worker has re-claimed and finished its run, then continues
    def freeze_mid_run() -> list[int]:
        wait_until(bed.running_on(frozen), 20, f"a run on {frozen.name}")
        frozen.signal_group(signal.SIGSTOP)
        time.sleep(0.4)
        stuck = [i for i, owner in bed.running() if frozen.owns(owner)]
        # Frozen while executing the agent, not between a statement and its commit (that
        # case is test_a_worker_frozen_inside_a_transaction_does_not_stall_recovery)
        if not stuck or bed.open_transactions(older_than_s=0.3):
            frozen.signal_group(signal.SIGCONT)
            return []
        return stuck

    stuck = wait_until(freeze_mid_run, 30, f"{frozen.name} frozen mid-run", interval=0.3)
    index = stuck[0]
    wait_until(
        lambda: all(bed.attempts_of(i)[-1][2] == "success" for i in stuck),
        60,
        "the frozen worker's runs to be finished by another worker",
    )
    frozen.signal_group(signal.SIGCONT)
    run_id = bed.store.find_run(bed.study_id, index).run_id
    wait_until(
        lambda: any(
            run_id in line and ("refused" in line or "no longer this worker's" in line)
            for line in frozen.log.splitlines()
        ),
        30,
        f"{frozen.name} to log that its late result for {run_id} was refused",
    )
    # Then the stopped attempt ended as lost, a newer attempt by the other worker succeeded
    # and is the one recorded, and the audit passes
    coordinator["thread"].join(100)
    assert "error" not in coordinator, coordinator.get("error")
    assert coordinator["report"].complete, bed.workers.tail()
    for i in stuck:
        history = bed.attempts_of(i)
        assert len(history) == 2, history
        (_, first_worker, first_outcome), (_, last_worker, last_outcome) = history
        assert frozen.owns(first_worker) and first_outcome == "lost", history
        assert other.owns(last_worker) and last_outcome == "success", history
        run = bed.store.find_run(bed.study_id, i)
        assert (run.attempt, run.status) == (2, "success")
    bed.audit()


@pytest.mark.timeout(120)
def test_a_worker_frozen_inside_a_transaction_does_not_stall_recovery(bed: Bed):
    # Given a submitted sweep in which two runs were claimed by workers that then went
    # silent: one froze between a statement and its commit, holding its run's row lock (as a
    # claim, heartbeat or finish holds it until COMMIT; a SIGSTOP, a VM pause or a network
    # partition leaves exactly this session on the server), the other one vanished
    bed.submit()
    frozen, vanished = 0, 1
    for index, name in ((frozen, "frozen"), (vanished, "vanished")):
        claim = bed.store.claim_run(bed.study_id, index, worker=f"{name}@test:1", lease_s=4)
        assert claim is not None
    engine = create_engine_for(bed.database_url)
    session = engine.connect()
    transaction = session.begin()
    try:
        session.execute(
            text("SELECT plan_index FROM runs WHERE study_id = :s AND plan_index = :i FOR UPDATE"),
            {"s": bed.study_id, "i": frozen},
        )
        # When two workers run the sweep and the coordinator waits, past both leases
        bed.workers.start(2)
        coordinator = bed.wait_in_background(timeout_s=100)
        # Then the vanished worker's run is re-queued and re-run while the frozen session
        # still holds its lock: one stuck row must not stall the recovery of the others
        try:
            wait_until(
                lambda: bed.store.find_run(bed.study_id, vanished).status == "success",
                30,
                "the vanished worker's run to be recovered while another worker is frozen",
                interval=0.5,
            )
        except AssertionError as stalled:
            raise AssertionError(
                f"{stalled}; the coordinator's reconcile is stuck behind the frozen session's "
                f"row lock: sessions waiting on a lock: {blocked_sessions(bed)}"
            ) from None
    finally:
        transaction.rollback()  # the frozen session ends without writing anything
        session.close()
        engine.dispose()
    # And once the frozen session is gone its run is recovered too, and the audit passes
    coordinator["thread"].join(100)
    assert "error" not in coordinator, coordinator.get("error")
    assert coordinator["report"].complete, bed.workers.tail()
    for index, name in ((frozen, "frozen"), (vanished, "vanished")):
        history = bed.attempts_of(index)
        assert [(worker, outcome) for _, worker, outcome in history[:1]] == [
            (f"{name}@test:1", "lost")
        ], history
        assert history[-1][2] == "success", history
    bed.audit()


def blocked_sessions(bed: Bed) -> list[str]:
    """What the sessions waiting on a lock in the sweep's database are running."""
    with bed.store.engine.connect() as connection:
        return [
            f"{row.wait_event_type}/{row.wait_event}: {row.query[:90]}"
            for row in connection.execute(
                text(
                    "SELECT wait_event_type, wait_event, query FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        ]
