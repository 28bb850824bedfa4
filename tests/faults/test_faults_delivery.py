"""Messages delivered more than once: every run published twice, and a backlog that waits in
the broker longer than ``queued_timeout_s``. Real workers on the shared Redis and PostgreSQL.
"""

from __future__ import annotations

from collections import Counter

import pytest
from fault_bed import Bed
from fault_services import wait_until

from orchestrator.embedded import register
from orchestrator.executors.celery import CeleryTransport

pytestmark = [pytest.mark.integration]


def publish_twice(bed: Bed) -> int:
    """Register and queue the study as ``submit`` does, then publish every run's message
    twice, back to back, through the coordinator's transport; returns how many were sent."""
    prepared = bed.prepared()
    register(bed.store, prepared)
    specs = list(prepared.run_specs())
    attempts = dict(bed.store.queue_runs(bed.study_id, [spec.index for spec in specs]))
    labels = {condition.condition_id: condition.label for condition in prepared.conditions}
    items = [(spec, attempts[spec.index], labels.get(spec.condition_id, "")) for spec in specs]
    with CeleryTransport(bed.settings, bed.broker_url) as transport:
        return transport.publish(
            [item for item in items for _ in range(2)], queue=bed.queue, timeout_s=None
        )


@pytest.mark.timeout(90)
def test_every_message_delivered_twice_executes_each_run_once(bed: Bed):
    # Given two workers
    bed.workers.start(2)
    # When every run's message is delivered twice
    assert publish_twice(bed) == 2 * bed.shape.runs
    report = bed.wait()
    # Then each run was claimed once and its agent called once; every second delivery was
    # acknowledged without executing (the queue is empty, nothing is left unacknowledged)
    assert report.complete and report.counts["success"] == bed.shape.runs
    audit = bed.audit()
    assert set(audit.attempts_per_run.values()) == {1}
    seeds = [run.seed for run in bed.store.iter_runs(bed.study_id)]
    assert Counter(bed.calls()) == Counter(seeds)
    assert bed.workers.log.count("'duplicate'") >= bed.shape.runs
    wait_until(lambda: bed.broker_backlog() == (0, 0), 30, "every delivery to be acknowledged")


@pytest.mark.timeout(90)
def test_a_backlog_waiting_longer_than_the_queued_timeout_is_not_published_again(bed: Bed):
    # Given one worker with one slot, so most runs wait in the queue longer than
    # queued_timeout_s (5 s here) although no message was lost
    bed.workers.start(1, concurrency=1)
    # When the study is submitted and waited for
    bed.submit()
    report = bed.wait()
    # Then every run succeeded once, and the coordinator published nothing again: a run
    # still waiting behind others in the broker is not a lost message
    assert report.complete
    bed.audit()
    duplicates = bed.workers.log.count("'duplicate'")
    assert (report.republished, duplicates) == (0, 0), (
        f"the reconcile loop re-published {report.republished} runs whose messages were still "
        f"queued; the worker spent {duplicates} deliveries on duplicates"
    )
