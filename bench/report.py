"""Benchmark: ``studyq report`` on a study of 100,000 finished runs.

Run from the repository root::

    .venv/bin/python bench/report.py                       # SQLite in a temporary folder
    .venv/bin/python bench/report.py --db postgresql+psycopg://postgres@127.0.0.1/bench_report
    .venv/bin/python bench/report.py --runs 20000           # a smaller study

What it does: registers a study (2 agents x 5 budgets = 10 conditions, 2 problems, replicates
to reach ``--runs``) through the same registration ``studyq run`` uses, then finishes every
run directly in the store in batches (a status, times, latency, cost, tokens and a primary
outcome per run, 5 % failed with one of four errors, one attempt per run spread over 8
workers): no agent runs, so filling takes seconds. Then ``studyq report`` is run in a child
process, once for HTML and once for Markdown, and the figures are printed: wall time
(interpreter start-up and imports included), the child's peak RSS (``os.wait4``) and the
file's size.

Goals (issue 13): the HTML report of 100,000 runs builds in < 10 s with peak RSS < 300 MB and
is < 5 MB. ``--check`` exits 1 when one is missed (they are not asserted in the tests).
A PostgreSQL ``--db`` must exist and be empty or hold no study ``bench-report``
(``createdb -h 127.0.0.1 -U postgres bench_report``); the study is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import bindparam, insert, update

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDY_ID = "bench-report"
GOALS = {"seconds": 10.0, "rss_mb": 300.0, "size_mb": 5.0}
BATCH = 5_000
WORKERS = [f"celery@node{n}:{1000 + n}" for n in range(8)]
ERRORS = [
    ("error", "ValueError", "candidate out of bounds"),
    ("timeout", "TimeoutError", "run exceeded 30 s"),
    ("error", "KeyError", "'width_m'"),
    ("lost", "WorkerLostError", "worker vanished"),
]

_STUDY = """\
study_id: {study_id}
title: Report benchmark (100,000 runs)
description: Two search strategies at five budgets on two problems, finished synthetically.
factors:
  - name: agent
    kind: manipulated
    levels:
      - {{name: random, value: random-search}}
      - {{name: hill_climb, value: hill-climb}}
  - name: budget
    kind: manipulated
    levels: [{{name: b1, value: 50}}, {{name: b2, value: 100}}, {{name: b3, value: 200}},
             {{name: b4, value: 400}}, {{name: b5, value: 800}}]
problem_ids: [beam-design, spring-design]
outcomes:
  - {{name: objective, source_table: runs, column: primary_outcome, aggregation: mean,
     primary: true}}
hypotheses:
  - {{hypothesis_id: h1, label: Budget helps, statement: A larger budget finds lighter designs.,
     independent_vars: [budget], dependent_vars: [objective], direction: less}}
run_budget: {{replicates: {replicates}}}
seed_policy: {{base_seed: 1}}
"""


def fill(url: str, runs: int) -> tuple[int, float]:
    """Register the study and finish its runs in the store; (runs, seconds)."""
    from orchestrator.embedded import register
    from orchestrator.store import ResultStore
    from orchestrator.store.engine import transaction
    from orchestrator.store.models import AttemptRow, RunRow
    from orchestrator.study.plan import prepare

    replicates = max(1, runs // 20)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "study.yaml"
        path.write_text(_STUDY.format(study_id=STUDY_ID, replicates=replicates), encoding="utf-8")
        prepared = prepare(path)
        with ResultStore.open(url) as store:
            store.delete_study(STUDY_ID)
            register(store, prepared)
            table = RunRow.__table__
            finish = (
                update(table)
                .where(table.c.study_id == bindparam("b_study"))
                .where(table.c.plan_index == bindparam("b_index"))
                .values(
                    status=bindparam("status"),
                    attempt=1,
                    attempts_used=1,
                    started_at=bindparam("started_at"),
                    ended_at=bindparam("ended_at"),
                    latency_s=bindparam("latency_s"),
                    cost_usd=bindparam("cost_usd"),
                    input_tokens=bindparam("input_tokens"),
                    output_tokens=bindparam("output_tokens"),
                    primary_outcome=bindparam("primary_outcome"),
                    error_kind=bindparam("error_kind"),
                    error_type=bindparam("error_type"),
                    error_message=bindparam("error_message"),
                )
            )
            rng = random.Random(7)
            t0 = datetime.now(UTC) - timedelta(hours=2)
            info = store.find_study(STUDY_ID)
            assert info is not None
            total = info.run_count
            for first in range(0, total, BATCH):
                rows, attempts = [], []
                for index in range(first, min(total, first + BATCH)):
                    begin = t0 + timedelta(seconds=7200 * index / total)
                    latency = rng.lognormvariate(-1.0, 0.8)
                    failed = rng.random() < 0.05
                    kind, kind_type, message = rng.choice(ERRORS) if failed else (None,) * 3
                    budget = (index // 2) % 5
                    rows.append(
                        {
                            "b_study": STUDY_ID,
                            "b_index": index,
                            "status": "failed" if failed else "success",
                            "started_at": begin,
                            "ended_at": begin + timedelta(seconds=latency),
                            "latency_s": latency,
                            "cost_usd": 0.0004 * latency,
                            "input_tokens": rng.randint(200, 900),
                            "output_tokens": rng.randint(50, 300),
                            "primary_outcome": None
                            if failed
                            else rng.gauss(20.0 - 2.0 * budget, 3.0),
                            "error_kind": kind,
                            "error_type": kind_type,
                            "error_message": message,
                        }
                    )
                    attempts.append(
                        {
                            "study_id": STUDY_ID,
                            "plan_index": index,
                            "attempt": 1,
                            "run_id": f"run-{index}",
                            "worker": WORKERS[index % len(WORKERS)],
                            "started_at": begin,
                            "ended_at": begin + timedelta(seconds=latency),
                            "outcome": "failed" if failed else "success",
                            "error_kind": kind,
                            "error_type": kind_type,
                            "error_message": message,
                        }
                    )
                with transaction(store.engine) as connection:
                    connection.execute(finish, rows)
                    connection.execute(insert(AttemptRow.__table__), attempts)
    return total, time.perf_counter() - started


def measure(url: str, fmt: str, out: Path) -> dict[str, float]:
    """``studyq report`` in a child process: wall seconds, peak RSS (MB), file size (MB)."""
    command = [
        str(REPO_ROOT / ".venv" / "bin" / "studyq"),
        "report",
        STUDY_ID,
        "--db",
        url,
        "--format",
        fmt,
        "--out",
        str(out),
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"studyq report exited {child.returncode}")
    return {
        "seconds": seconds,
        "rss_mb": usage.ru_maxrss / 1024,
        "size_mb": out.stat().st_size / (1024 * 1024),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", default=None, help="store URL (default: SQLite in a temp dir)")
    parser.add_argument("--runs", type=int, default=100_000, help="runs in the study")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        url = args.db or f"sqlite:///{Path(folder) / 'bench.db'}"
        runs, fill_s = fill(url, args.runs)
        print(f"store: {url.split('://')[0]}, {runs:,} runs filled in {fill_s:.1f} s")
        missed = []
        for fmt in ("html", "md"):
            figures = measure(url, fmt, Path(folder) / f"report.{fmt}")
            print(
                f"studyq report --format {fmt}: {figures['seconds']:.2f} s, peak RSS "
                f"{figures['rss_mb']:.0f} MB, file {figures['size_mb'] * 1024:,.0f} KB"
            )
            if fmt == "html":
                missed = [name for name, goal in GOALS.items() if figures[name] >= goal]
        print(
            "goals (html): < 10 s, < 300 MB peak RSS, < 5 MB: "
            + ("met" if not missed else "missed: " + ", ".join(missed))
        )
        if args.db:
            from orchestrator.store import ResultStore

            with ResultStore.open(url) as store:
                store.delete_study(STUDY_ID)
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    raise SystemExit(main())
