"""``studyq wait`` ends with the study's answer: a sweep of the demo search agents submitted to
the session's real workers (``worker_pair``: ``celery worker`` and ``studyq worker``, real
PostgreSQL), then ``studyq wait`` prints the primary outcome by condition (n, mean, 95 % CI,
the best condition marked by the study's declared direction) and the report command."""

from __future__ import annotations

import statistics
import uuid
from pathlib import Path

import pytest
from _services import Broker
from dist_services import WorkerPair

from orchestrator.cli import EXIT_OK, main
from orchestrator.store import ResultStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.redis_only("the table is read from the store; the broker does not change it"),
]

STUDY = """\
study_id: {study_id}
title: Wait ends with the answer
factors:
  - name: agent
    levels:
      - {{name: random, value: random-search}}
      - {{name: hill_climb, value: hill-climb}}
problem_ids: [beam-design]
outcomes:
  - {{name: objective, source_table: runs, column: primary_outcome, aggregation: mean,
     primary: true}}
hypotheses:
  - {{hypothesis_id: h1, label: lighter, statement: Hill climbing finds lighter beams.,
     independent_vars: [agent], dependent_vars: [objective], direction: less}}
run_budget: {{replicates: 4}}
execution: {{queue: {queue}}}
"""


def test_wait_ends_with_the_outcome_table(
    worker_pair: WorkerPair,
    pg_url: str,
    live_broker: Broker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a study submitted to real workers
    study_id = f"wait-table-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "study.yaml"
    path.write_text(STUDY.format(study_id=study_id, queue=worker_pair.queue), encoding="utf-8")
    urls = ["--db", pg_url, "--broker", live_broker.url]
    assert main(["submit", str(path), *urls, "--no-progress"]) == EXIT_OK
    capsys.readouterr()
    # When studyq wait sees it through
    code = main(["wait", study_id, *urls, "--no-progress", "--timeout", "90"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, out + err
    # Then it ends with the outcome by condition, each row's n and mean those of the store
    with ResultStore.open(pg_url) as store:
        runs = [r for r in store.iter_runs(study_id) if r.status == "success"]
    values: dict[str, list[float]] = {}
    for run in runs:
        values.setdefault(str(run.agent_key), []).append(float(run.primary_outcome))
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("objective by condition"))
    assert "lower is better" in lines[head]
    rows = lines[head + 2 : head + 4]
    for agent, row in zip(("random-search", "hill-climb"), rows, strict=True):
        assert f"agent={agent}" in row
        assert f" {len(values[agent])} " in row and f"{statistics.mean(values[agent]):.4g}" in row
    best = min(values, key=lambda agent: statistics.mean(values[agent]))
    assert [row for row in rows if row.startswith("  *")] == [
        next(row for row in rows if f"agent={best}" in row)
    ]
    # And the command that opens the report
    assert f"report:    studyq report {study_id} --db {pg_url} --out report.html" in lines
