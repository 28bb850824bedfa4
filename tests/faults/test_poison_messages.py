"""Poison messages on the real queue, while real workers of both pools run a sweep: each is
quarantined (logged once, moved to the queue's dead-letter list, acknowledged), no worker
stops, nothing of them reaches the store, and no other message is redelivered because of
them. The hostile messages are ``poison_catalogue.py``'s; their classification alone is
tested in ``test_poison_classification.py``."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import redis
from fault_bed import Bed
from fault_services import wait_until
from poison_catalogue import Hostile, hostile_messages
from sqlalchemy import text

from orchestrator.cli import EXIT_OK, main
from orchestrator.embedded import register
from orchestrator.executors.celery import CeleryTransport

pytestmark = [pytest.mark.integration]

CHUNK = 30
"""Runs published between two pushes of hostile messages."""


def publish_with_poison(bed: Bed, client: redis.Redis, hostile: list[Hostile]) -> None:
    """Register and queue the study as ``submit`` does, then publish its runs in chunks of
    :data:`CHUNK` with a few hostile messages ``LPUSH``-ed raw between two chunks, so workers
    meet them between genuine runs, with runs in flight on their other slots."""
    prepared = bed.prepared()
    register(bed.store, prepared)
    specs = list(prepared.run_specs())
    attempts = dict(bed.store.queue_runs(bed.study_id, [spec.index for spec in specs]))
    labels = {condition.condition_id: condition.label for condition in prepared.conditions}
    items = [(spec, attempts[spec.index], labels.get(spec.condition_id, "")) for spec in specs]
    chunks = [items[start : start + CHUNK] for start in range(0, len(items), CHUNK)]
    per_gap = -(-len(hostile) // (len(chunks) - 1))
    pending = list(hostile)
    with CeleryTransport(bed.settings, bed.broker_url) as transport:
        for chunk in chunks:
            transport.publish(chunk, queue=bed.queue, timeout_s=None)
            for message in pending[:per_gap]:
                client.lpush(bed.queue, message.raw)
            del pending[:per_gap]
    assert not pending


@pytest.mark.redis_only("plants raw messages in Redis and reads the Redis quarantine")
@pytest.mark.timeout(240)
def test_poison_messages_are_quarantined_and_the_sweep_is_unharmed(
    bed: Bed, capsys: pytest.CaptureFixture[str]
):
    # Given a prefork worker and a threads worker (two slots each) on the sweep's queue
    [prefork] = bed.workers.start(1)
    [threads] = bed.workers.start(1, pool="threads")
    processes = {worker.name: (worker.pid, worker.children()) for worker in (prefork, threads)}
    assert len(processes[prefork.name][1]) == 2
    client = redis.Redis.from_url(bed.broker_url)
    first = next(iter(bed.prepared().run_specs()))
    hostile = hostile_messages(bed.queue, first)
    assert len(hostile) >= 25 and any(m.raw == b'{"body": 5}' for m in hostile)

    # When the sweep's runs are published with the hostile messages pushed raw between them,
    # and the coordinator waits for the sweep
    publish_with_poison(bed, client, hostile)
    report = bed.wait(timeout_s=90)

    # Then every worker is still up, as the same processes
    assert report.complete
    assert {w.name: (w.pid, w.children()) for w in (prefork, threads) if w.alive()} == processes
    log = bed.workers.log
    assert "CRITICAL" not in log and "Unrecoverable error" not in log, bed.workers.tail()
    # ...the sweep passes the usual audit, and no run was executed twice: each run has one
    # attempt and one agent call, no delivery was a duplicate, nothing was restored
    audit = bed.audit()
    assert set(audit.attempts_per_run.values()) == {1}
    seeds = [run.seed for run in bed.store.iter_runs(bed.study_id)]
    assert Counter(bed.calls()) == Counter(seeds)
    assert log.count("'duplicate'") == 0
    assert "unacknowledged message" not in log  # kombu's "Restoring N unacknowledged ..."
    wait_until(lambda: bed.broker_backlog() == (0, 0), 30, "an empty queue, nothing unacked")
    # ...nothing of the hostile messages reached the store: no other study, run or attempt
    with bed.store.engine.connect() as connection:
        counts = connection.execute(
            text(
                "SELECT (SELECT count(*) FROM studies), (SELECT count(*) FROM runs), "
                "(SELECT count(*) FROM run_attempts)"
            )
        ).one()
    assert tuple(counts) == (1, bed.shape.runs, bed.shape.runs)
    # ...each hostile message was logged once, at ERROR, with its reason
    lines = [line for line in log.splitlines() if "quarantined a message on queue" in line]
    assert len(lines) == len(hostile), "\n".join(lines)
    assert all("ERROR/" in line for line in lines)
    logged = Counter(re.findall(r"on queue \S+: (\w+):", "\n".join(lines)))
    expected = Counter(str(m.reason) for m in hostile)
    assert logged == expected
    # ...and each is in the queue's dead-letter list with its reason, worker and task id
    with CeleryTransport(bed.settings, bed.broker_url) as transport:
        letters = transport.dead_letters(bed.queue)
        assert transport.dead_letter_count(bed.queue) == len(hostile)
    assert Counter(letter.reason for letter in letters) == expected
    by_id = {letter.task_id: letter for letter in letters if letter.task_id}
    for message in hostile:
        if message.task_id is not None:
            assert by_id[message.task_id].reason == message.reason, message.name
    assert {letter.queue for letter in letters} == {bed.queue}
    nodes = {prefork.nodename, threads.nodename}
    assert {letter.worker.rsplit(":", 1)[0] for letter in letters} <= nodes
    assert all(letter.time.endswith("+00:00") for letter in letters)
    body5 = [letter for letter in letters if letter.raw == '{"body": 5}']
    assert [letter.reason for letter in body5] == ["not_envelope"]
    assert max(len(letter.raw) for letter in letters) <= 4096

    # When someone lists the dead letters, looks at the study, then purges the list
    urls = ["--broker", bed.broker_url]
    assert main(["dead-letters", "--queue", bed.queue, "--limit", "100", *urls]) == EXIT_OK
    listing = capsys.readouterr().out
    assert main(["status", bed.study_id, "--db", bed.database_url, *urls]) == EXIT_OK
    status = capsys.readouterr().out
    assert main(["dead-letters", "--queue", bed.queue, "--purge", *urls]) == EXIT_OK
    purged = capsys.readouterr().out
    assert main(["dead-letters", "--queue", bed.queue, *urls]) == EXIT_OK
    after = capsys.readouterr().out
    # Then the listing shows every entry newest first with its reason, the status its count,
    # the purge how many it deleted, and the list is empty afterwards
    assert f"queue {bed.queue}: {len(hostile)} dead letter(s), newest first" in listing
    shown = re.findall(r"^(\S+ \S+) UTC  (\w+)  worker ", listing, flags=re.MULTILINE)
    assert [reason for _, reason in shown] == [letter.reason for letter in letters]
    assert [when for when, _ in shown] == sorted((when for when, _ in shown), reverse=True)
    assert f"dead letters: {len(hostile)} on queue {bed.queue}" in status
    assert f"queue {bed.queue}: purged {len(hostile)} dead letter(s)" in purged
    assert f"queue {bed.queue}: no dead letters" in after
    client.close()
