"""Revision 0007: ``study_counts`` follows every path that moves a run, on both backends.

The count a tick reads is kept by triggers, not computed; so after each kind of transition
(registration, queueing, claims, heartbeats, results one by one and batched, a warm release,
expired leases requeued and failed as lost, cancel, resubmit, deleting a study) it must
equal a ``GROUP BY`` over the runs themselves. On PostgreSQL the rows are per backend:
concurrent sessions write their own, and folding the rows of backends that have gone keeps
every total.
"""

from __future__ import annotations

import time

import pytest
from alembic import command
from sqlalchemy import func, select, text
from store_factories import STUDY_ID, claim, expire_lease, make_result, queue_all, register

from orchestrator.contracts.results import RunStatus
from orchestrator.store import ResultStore, upgrade
from orchestrator.store.counts import fold
from orchestrator.store.engine import transaction
from orchestrator.store.models import RunRow, StudyCountRow
from orchestrator.store.schema import alembic_config

OTHER = "other-study"


def _true_counts(store: ResultStore, study_id: str = STUDY_ID) -> dict[str, int]:
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(RunRow.status, func.count())
            .where(RunRow.study_id == study_id)
            .group_by(RunRow.status)
        ).all()
    return {status.value: 0 for status in RunStatus} | {status: n for status, n in rows}


def _agrees(store: ResultStore, study_id: str = STUDY_ID) -> dict[str, int]:
    counts = store.count_by_status(study_id)
    assert counts == _true_counts(store, study_id)
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


@pytest.mark.integration
def test_backends_count_on_their_own_rows_and_folding_keeps_the_totals(
    store: ResultStore, other_store: ResultStore
) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("per-backend rows are PostgreSQL's")
    register(store, 30)
    queue_all(store)
    mine = [claim(store, index) for index in range(10)]
    theirs = [
        other_store.claim_run(STUDY_ID, index, worker="w2", lease_s=60.0) for index in range(10, 20)
    ]
    for won in mine:
        store.finish_run(won, make_result(won))
    for won in theirs:
        assert won is not None
        other_store.finish_run(won, make_result(won))
    shards = {shard for shard, _, _ in _count_rows(store)}
    assert len(shards) >= 2  # the registering/claiming backends of both stores
    assert _agrees(store)["success"] == 20

    # Folding leaves the rows of live backends alone ...
    with transaction(store.engine) as connection:
        fold(connection, STUDY_ID)
    assert {shard for shard, _, _ in _count_rows(store)} == shards
    # ... and moves those of backends that have gone into shard 0, totals unchanged.
    other_store.close()
    deadline = time.monotonic() + 10.0
    while True:  # a closed connection's backend leaves pg_stat_activity a moment later
        with store.engine.connect() as connection:
            live = set(connection.execute(text("SELECT pid FROM pg_stat_activity")).scalars())
        gone = shards - live
        if gone or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert gone, (shards, live)
    with transaction(store.engine) as connection:
        fold(connection, STUDY_ID)
    after = {shard for shard, _, _ in _count_rows(store)}
    assert not after & gone and 0 in after
    assert _agrees(store)["success"] == 20


def test_a_large_registration_is_counted_once(store: ResultStore) -> None:
    """Registration on PostgreSQL streams the runs with ``COPY`` in pages: each page's
    statement trigger counts its rows once."""
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
