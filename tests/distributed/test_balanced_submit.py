"""``studyq submit --order balanced`` on a real sweep: a real worker, Redis, PostgreSQL.

Workers take runs in the order they were published. Published balanced (replicate by
replicate, shuffled inside each), a study cancelled part way holds every condition within
one replicate of the others; published in plan order, the same cut holds the first
condition's replicates and nothing of the last (which is what the balanced case is tested
against).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from _services import Broker
from dist_services import WorkerProcess

from orchestrator.contracts.settings import Settings
from orchestrator.distributed import cancel, submit_study
from orchestrator.export import export_artifacts
from orchestrator.store import ResultStore
from orchestrator.study.model import Study, parse_study

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.redis_only("dispatch order is the coordinator's; one broker shows it"),
]

CONDITIONS = 4
REPLICATES = 25
CUT = 30  # cancel once this many runs succeeded


@pytest.fixture(scope="module")
def balanced_queue(live_broker: Broker) -> Iterator[str]:
    name = f"studyq-balanced-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    yield name
    live_broker.forget(name)


@pytest.fixture(scope="module")
def worker(
    pg_url: str, live_broker: Broker, balanced_queue: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One threads worker with two slots: runs finish in about the order they were sent."""
    process = WorkerProcess(
        f"balanced-{os.getpid()}",
        queue=balanced_queue,
        database_url=pg_url,
        broker_url=live_broker.url,
        log_dir=tmp_path_factory.mktemp("balanced-logs"),
        concurrency=2,
        pool="threads",
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def _study(queue: str, order: str) -> Study:
    return parse_study(
        {
            "study_id": f"balanced-{order}-{uuid.uuid4().hex[:8]}",
            "title": "balanced dispatch on the cluster",
            "agent_specs": ["sleep"],
            "problem_ids": ["noop"],
            "run_budget": {"replicates": REPLICATES},
            "factors": [
                {
                    "name": "sleep_s",
                    "kind": "manipulated",
                    "levels": [
                        {"name": f"c{i}", "value": 0.02 + i * 0.0001} for i in range(CONDITIONS)
                    ],
                }
            ],
            "design_spec": {"kind": "full_factorial"},
            "execution": {"queue": queue, "order": order},
        }
    )


def _cut_short(study: Study, settings: Settings) -> Counter[str]:
    """Submit, cancel once ``CUT`` runs succeeded, wait for the runs in flight; the
    successes per condition."""
    submit_study(study, settings=settings)
    with ResultStore.open(str(settings.database_url)) as store:
        deadline = time.monotonic() + 60
        while store.count_by_status(study.study_id)["success"] < CUT:
            assert time.monotonic() < deadline, store.count_by_status(study.study_id)
            time.sleep(0.05)
        cancel(study.study_id, settings=settings)
        while store.count_by_status(study.study_id)["running"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return Counter(
            run.spec.condition_id
            for run in store.iter_runs(study.study_id)
            if run.status == "success"
        )


@pytest.mark.parametrize("order", ["balanced", "plan"])
def test_a_study_cut_short_is_balanced_only_when_published_balanced(
    order: str,
    worker: WorkerProcess,
    pg_url: str,
    live_broker: Broker,
    balanced_queue: str,
    tmp_path: Path,
) -> None:
    # Given a study of 4 conditions x 25 replicates published in `order` to a live worker
    settings = Settings(database_url=pg_url, broker_url=live_broker.url)
    study = _study(balanced_queue, order)
    # When it is cancelled after about 30 runs
    done = _cut_short(study, settings)
    # Then balanced: every condition is within one replicate of the others; plan order: the
    # first condition holds most of them and the last none
    per_condition = [done.get(c, 0) for c in _condition_ids(study)]
    assert sum(per_condition) >= CUT
    if order == "balanced":
        assert max(per_condition) - min(per_condition) <= 1, per_condition
    else:
        assert per_condition[0] == REPLICATES and per_condition[-1] == 0, per_condition
    # And the export's manifest says how complete each condition is
    with ResultStore.open(pg_url) as store:
        export_artifacts(store, study.study_id, tmp_path / "out", run_files=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    completion = manifest["condition_completion"]
    assert set(completion) == set(_condition_ids(study))
    for condition_id, successes in zip(_condition_ids(study), per_condition, strict=True):
        entry = completion[condition_id]
        assert entry["runs"] == REPLICATES and entry["label"].startswith("sleep_s=")
        assert entry["status_counts"].get("success", 0) == successes
        assert entry["finished"] == round(
            (successes + entry["status_counts"].get("failed", 0)) / REPLICATES, 4
        )


def _condition_ids(study: Study) -> list[str]:
    from orchestrator.study.plan import prepare

    return [condition.condition_id for condition in prepare(study).conditions]
