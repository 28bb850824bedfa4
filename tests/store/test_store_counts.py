"""Revision 0007: ``study_counts`` follows every path that moves a run, on both backends.

The count a tick reads is kept by triggers, not computed; so after each kind of transition
(registration, queueing, claims, heartbeats, results one by one and batched, a warm release,
expired leases requeued and failed as lost, a late result, orphans taken back, cancel,
resubmit, deleting a study) it must
equal a ``GROUP BY`` over the runs themselves. On PostgreSQL the rows are per backend:
concurrent sessions write their own, and folding the rows of backends that have gone keeps
every total.
"""

from __future__ import annotations

import time

import pytest
from alembic import command
from sqlalchemy import select, text
from store_factories import (
    STUDY_ID,
    claim,
    expire_lease,
    make_result,
    queue_all,
    register,
    true_counts,
)

from orchestrator.contracts.results import RunStatus
from orchestrator.store import ResultStore, upgrade
from orchestrator.store.counts import fold
from orchestrator.store.engine import create_engine_for, transaction
from orchestrator.store.models import StudyCountRow
from orchestrator.store.schema import alembic_config

OTHER = "other-study"


def _agrees(store: ResultStore, study_id: str = STUDY_ID) -> dict[str, int]:
    counts = store.count_by_status(study_id)
    assert counts == true_counts(store, study_id)
    return counts


def _count_rows(store: ResultStore, study_id: str = STUDY_ID) -> list[tuple[int, str, int]]:
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(StudyCountRow.shard, StudyCountRow.status, StudyCountRow.n)
            .where(StudyCountRow.study_id == study_id)
            .order_by(StudyCountRow.shard, StudyCountRow.status)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def test_every_transition_keeps_the_count(store: ResultStore) -> None:
    register(store, 20, max_attempts=2)
    register(store, 5, study_id=OTHER)
    assert _agrees(store)["planned"] == 20
    queue_all(store)
    assert _agrees(store)["queued"] == 20

    claims = [claim(store, index) for index in range(10)]
    assert store.heartbeat(claims[0], 60.0)
    assert _agrees(store)["running"] == 10
    store.finish_run(claims[0], make_result(claims[0]))
    store.finish_run(claims[1], make_result(claims[1], RunStatus.FAILED, error_type="E"))
    store.finish_runs_batch(
        [(won, make_result(won)) for won in claims[2:5]]
        + [(claims[5], make_result(claims[5], RunStatus.FAILED, error_type="E"))]
    )
    assert store.release_run(claims[6])
    _agrees(store)
    assert store.count_by_status(STUDY_ID)["success"] == 4

    # an expired lease with an attempt left is requeued; one on its last attempt fails lost
    expire_lease(store, claims[7])
    last = claims[8]
    expire_lease(store, last)
    store.reconcile(STUDY_ID)
    again = claim(store, last.index)
    expire_lease(store, again)
    store.reconcile(STUDY_ID)
    counts = _agrees(store)
    assert counts["failed"] == 3

    # the late result of a requeued attempt still lands (queued -> success)
    assert store.finish_run(claims[7], make_result(claims[7]))
    assert _agrees(store)["success"] == 5
    # a dead owner's claims are taken back: one it started is charged, one it did not is not
    dead = [claim(store, index, worker="gone") for index in (10, 11)]
    store.take_back_orphans(
        STUDY_ID,
        is_dead=lambda owner: owner == "gone",
        started_by=lambda owner: {(dead[0].index, dead[0].attempt)},
    )
    assert _agrees(store)["running"] == 1  # claims[9]; 10 and 11 are queued again

    assert store.requeue_for_resubmit(STUDY_ID) == 3
    assert _agrees(store)["planned"] == 3
    store.cancel(STUDY_ID)
    assert _agrees(store)["cancelled"] > 0
    assert _agrees(store, OTHER) == {status.value: 0 for status in RunStatus} | {"planned": 5}

    assert store.delete_study(STUDY_ID)
    assert _count_rows(store) == []
    assert _agrees(store, OTHER)["planned"] == 5


def test_a_migrated_store_counts_the_studies_it_already_held(store: ResultStore) -> None:
    register(store, 12)
    queue_all(store)
    for index in range(5):
        won = claim(store, index)
        store.finish_run(won, make_result(won))
    before = store.count_by_status(STUDY_ID)

    with transaction(store.engine) as connection:
        command.downgrade(alembic_config(connection), "0006")
    upgrade(store.engine)

    assert _agrees(store) == before
    assert [shard for shard, _, _ in _count_rows(store)] == [0, 0]


def _shards(store: ResultStore) -> set[int]:
    return {shard for shard, _, _ in _count_rows(store)}


def _finish_some(store: ResultStore, indices: range, worker: str) -> None:
    for index in indices:
        won = store.claim_run(STUDY_ID, index, worker=worker, lease_s=60.0)
        assert won is not None
        store.finish_run(won, make_result(won))


def _gone(store: ResultStore, shards: set[int]) -> set[int]:
    """Those of ``shards`` whose backend has left pg_stat_activity (a closed connection's
    backend leaves it a moment later)."""
    deadline = time.monotonic() + 10.0
    while True:
        with store.engine.connect() as connection:
            live = set(connection.execute(text("SELECT pid FROM pg_stat_activity")).scalars())
        if not shards & live or time.monotonic() > deadline:
            return shards - live
        time.sleep(0.05)


@pytest.mark.integration
def test_backends_count_on_their_own_rows_and_folding_keeps_the_totals(
    store: ResultStore, other_store: ResultStore, store_url: str
) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("per-backend rows are PostgreSQL's")
    third = ResultStore(create_engine_for(store_url))
    register(store, 30)
    queue_all(store)
    _finish_some(store, range(0, 10), "w1")
    ours = _shards(store)
    _finish_some(other_store, range(10, 20), "w2")
    theirs = _shards(store) - ours
    _finish_some(third, range(20, 25), "w3")
    thirds = _shards(store) - ours - theirs
    assert theirs and thirds  # each store's backends wrote rows of their own
    assert _agrees(store)["success"] == 25

    # Folding leaves the rows of live backends alone ...
    with transaction(store.engine) as connection:
        assert fold(connection, STUDY_ID)
    assert _shards(store) == ours | theirs | thirds
    # ... and moves those of backends that have gone into shard 0 (a new row, then added
    # to it), totals unchanged.
    other_store.close()
    assert _gone(store, theirs) == theirs
    with transaction(store.engine) as connection:
        assert fold(connection, STUDY_ID)
    assert _shards(store) == ours | thirds | {0}
    third.close()
    assert _gone(store, thirds) == thirds
    with transaction(store.engine) as connection:
        assert fold(connection, STUDY_ID)
    assert _shards(store) == ours | {0}
    assert _agrees(store)["success"] == 25

    # One fold at a time: a second one meanwhile does nothing, and waits for nothing.
    with transaction(store.engine) as connection:
        assert fold(connection, STUDY_ID)
        rival = create_engine_for(store_url)
        try:
            with transaction(rival) as elsewhere:
                assert not fold(elsewhere, STUDY_ID)
        finally:
            rival.dispose()

    # A study's deletion takes its folded counts with it.
    assert store.delete_study(STUDY_ID)
    assert _count_rows(store) == []


def test_a_large_registration_is_counted_once(store: ResultStore) -> None:
    """Registration on PostgreSQL streams the runs with one ``COPY``: its statement trigger
    counts them once, from the statement's transition table."""
    register(store, 2500)
    assert _agrees(store) == {status.value: 0 for status in RunStatus} | {"planned": 2500}


def test_the_groupings_of_one_pass_match_each_grouping_alone(store: ResultStore) -> None:
    register(store, 12)
    queue_all(store)
    for index in range(6):
        won = claim(store, index)
        status = RunStatus.FAILED if index % 3 == 0 else RunStatus.SUCCESS
        store.finish_run(won, make_result(won, status, error_type="E"))

    each = store.count_by_each(STUDY_ID)

    assert list(each) == ["condition", "agent", "problem"]
    for by, groups in each.items():
        assert groups == store.count_by(STUDY_ID, by)
        assert sum(sum(per.values()) for per in groups.values()) == 12
    assert sum(per.get("failed", 0) for per in each["condition"].values()) == 2
    with pytest.raises(ValueError, match="got 'nope'"):
        store.count_by(STUDY_ID, "nope")
