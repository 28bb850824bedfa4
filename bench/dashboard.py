"""Benchmark: each ``studyq dashboard`` page for a study of 100,000 runs, with 20 studies in
the database, answers in < 200 ms median (issue 13). Results: docs/benchmarks.md.

Run from the repository root (PostgreSQL on 127.0.0.1:5432, trust auth for ``postgres``)::

    .venv/bin/python bench/dashboard.py                 # 100,000 runs, 20 studies, 20 requests
    .venv/bin/python bench/dashboard.py --runs 20000 --requests 10   # quicker
    .venv/bin/python bench/dashboard.py --keep          # keep the database (prints its URL)
    .venv/bin/python bench/dashboard.py --check         # exit 1 when a page is over 200 ms
    .venv/bin/python bench/dashboard.py --requests 3 --screenshot docs/images/dashboard.png
                                     # README's picture: the big study's page in Chromium

What it does:

1. Creates a throwaway database ``studyq_bench_dashboard_<pid>`` and migrates it.
2. Registers 20 studies through ``orchestrator.embedded.register`` (what ``studyq run`` and
   ``studyq submit`` call): one of ``--runs`` runs (4 agents x 5 levels of a factor = 20
   conditions x 2 problems x replicates) and 19 of 500 runs.
3. Fills every study's results in SQL, as a sweep in progress would have left them: 83 %
   success, 10 % failed (3 error types, 5 messages), 3 % running, 4 % queued; end times over
   the last two hours, latency, cost, tokens, a numeric primary outcome and ``metrics``, one
   attempt row per claimed run, and one ``mass`` evaluation per successful run. Then
   ``ANALYZE`` (what autovacuum does on a real database).
4. Serves the dashboard on a real uvicorn on 127.0.0.1 (a thread of this process) and
   requests each page ``--requests`` times over one keep-alive HTTP connection, after two
   warm-up requests, and prints the median, min and max in milliseconds, and each page's
   size; twice: with the database read on every request (``snapshot_s=0``: what one
   page's SQL and rendering cost), and as ``studyq dashboard`` serves it (the studies list
   and a study's figures kept at most 2 s and recomputed in the background, see
   ``orchestrator.dashboard.app.Dashboard.snapshot``). ``--check`` applies the goal to the
   second. The pages are those the browser loads: the studies page and its live fragment; the
   big study's page, its live fragment (what the page fetches every 3 s), with an evaluation
   metric chosen, its largest failure group's runs; one run's page and fragment.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
GOAL_MS = 200.0
BIG = "bench-dashboard-big"
SMALL_RUNS = 500
STUDIES = 20

FILL = """
WITH r AS (
    SELECT plan_index, random() AS h, random() AS u, random() AS v
    FROM runs WHERE study_id = :study
)
UPDATE runs AS t SET
    status = CASE WHEN r.h < 0.83 THEN 'success' WHEN r.h < 0.93 THEN 'failed'
                  WHEN r.h < 0.96 THEN 'running' ELSE 'queued' END,
    attempt = CASE WHEN r.h < 0.96 THEN 1 ELSE 0 END,
    attempts_used = CASE WHEN r.h < 0.96 THEN 1 ELSE 0 END,
    queued_at = now() - interval '2 hours' - interval '1 minute',
    started_at = CASE WHEN r.h < 0.96
        THEN now() - interval '2 hours' + (t.plan_index::float / :n) * interval '2 hours'
        END,
    ended_at = CASE WHEN r.h < 0.93
        THEN now() - interval '2 hours' + (t.plan_index::float / :n) * interval '2 hours'
             + (0.2 + 3 * r.u) * interval '1 second'
        END,
    lease_owner = CASE WHEN r.h >= 0.93 AND r.h < 0.96 THEN 'bench-host:' || (t.plan_index % 8) END,
    lease_expires_at = CASE WHEN r.h >= 0.93 AND r.h < 0.96 THEN now() + interval '1 minute' END,
    latency_s = CASE WHEN r.h < 0.93 THEN 0.2 + 3 * r.u END,
    cost_usd = CASE WHEN r.h < 0.93 THEN 0.001 + 0.01 * r.v END,
    input_tokens = CASE WHEN r.h < 0.93 THEN (200 + 800 * r.v)::bigint END,
    output_tokens = CASE WHEN r.h < 0.93 THEN (50 + 300 * r.u)::bigint END,
    primary_outcome = CASE WHEN r.h < 0.83
        THEN to_jsonb(10 + (t.plan_index % 20) + 5 * r.v) END,
    metrics = CASE WHEN r.h < 0.83 THEN jsonb_build_object(
        'mass', 10 + (t.plan_index % 20) + 5 * r.v,
        'evaluations_used', (10 + 90 * r.u)::int) END,
    outputs = CASE WHEN r.h < 0.83 THEN jsonb_build_object('text', 'ok') END,
    error_kind = CASE WHEN r.h >= 0.83 AND r.h < 0.93 THEN 'error' END,
    error_type = CASE WHEN r.h >= 0.83 AND r.h < 0.93
        THEN (ARRAY['TimeoutError', 'RateLimitError', 'ValueError'])[1 + (t.plan_index % 3)] END,
    error_message = CASE WHEN r.h >= 0.83 AND r.h < 0.93
        THEN 'failure number ' || (t.plan_index % 5) END
FROM r
WHERE t.study_id = :study AND t.plan_index = r.plan_index
"""

ATTEMPTS = """
INSERT INTO run_attempts (study_id, plan_index, attempt, run_id, worker, started_at,
                          ended_at, outcome, error_kind, error_type, error_message)
SELECT study_id, plan_index, 1, run_id, 'bench-host:' || (plan_index % 8), started_at,
       ended_at, status, error_kind, error_type, error_message
FROM runs WHERE study_id = :study AND started_at IS NOT NULL
"""

EVALUATIONS = """
INSERT INTO evaluations (study_id, plan_index, seq, run_id, attempt, evaluator_id,
                         metric_name, metric_value, metric_unit, aggregation_level, extra)
SELECT study_id, plan_index, 0, run_id, 1, 'bench', 'mass', metrics -> 'mass', 'kg', 'run',
       '{}'::jsonb
FROM runs WHERE study_id = :study AND status = 'success'
"""


def _study_file(folder: Path, study_id: str, *, agents: int, levels: int, reps: int) -> Path:
    names = ["random-search", "hill-climb", "annealing", "noop"][:agents]
    agent_levels = ", ".join(f"{{name: a{i}, value: {name}}}" for i, name in enumerate(names))
    budget_levels = ", ".join(f"{{name: b{i}, value: {10 * (i + 1)}}}" for i in range(levels))
    path = folder / f"{study_id}.yaml"
    path.write_text(
        f"""\
study_id: {study_id}
title: Dashboard benchmark {study_id}
factors:
  - name: agent
    kind: manipulated
    levels: [{agent_levels}]
  - name: budget
    kind: manipulated
    levels: [{budget_levels}]
problem_ids: [beam-design, spring-design]
outcomes:
  - {{name: objective, source_table: runs, column: primary_outcome, aggregation: mean,
      primary: true}}
hypotheses:
  - hypothesis_id: h1
    label: Search lowers the objective
    statement: Hill climbing finds lighter designs.
    independent_vars: [agent]
    dependent_vars: [objective]
    direction: less
run_budget: {{replicates: {reps}}}
seed_policy: {{base_seed: 1}}
""",
        encoding="utf-8",
    )
    return path


def fill(url: str, folder: Path, runs: int) -> None:
    from sqlalchemy import text

    from orchestrator.embedded import register
    from orchestrator.store import ResultStore
    from orchestrator.study.plan import prepare

    big_reps = max(1, runs // 40)
    plans = [(BIG, 4, 5, big_reps)] + [
        (f"bench-dashboard-{i:02d}", 2, 1, SMALL_RUNS // 4) for i in range(1, STUDIES)
    ]
    with ResultStore.open(url) as store:
        for study_id, agents, levels, reps in plans:
            started = time.perf_counter()
            path = _study_file(folder, study_id, agents=agents, levels=levels, reps=reps)
            report = register(store, prepare(path))
            with store.engine.begin() as connection:
                connection.execute(text("SELECT setseed(0.42)"))
                n = connection.execute(
                    text("SELECT count(*) FROM runs WHERE study_id = :s"), {"s": study_id}
                ).scalar_one()
                params = {"study": study_id, "n": n}
                connection.execute(text(FILL), params)
                connection.execute(text(ATTEMPTS), {"study": study_id})
                connection.execute(text(EVALUATIONS), {"study": study_id})
            if study_id == BIG:
                print(
                    f"  {study_id}: {report.run_count if hasattr(report, 'run_count') else n:,} "
                    f"runs registered and filled in {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
        with store.engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            connection.execute(text("ANALYZE"))


def _pages(url: str) -> list[tuple[str, str]]:
    from sqlalchemy import text

    from orchestrator.store import ResultStore

    with ResultStore.open(url) as store, store.engine.connect() as connection:
        run_id = connection.execute(
            text("SELECT run_id FROM runs WHERE study_id = :s AND status = 'failed' LIMIT 1"),
            {"s": BIG},
        ).scalar_one()
        kind, kind_type, message = connection.execute(
            text(
                "SELECT error_kind, error_type, error_message FROM runs "
                "WHERE study_id = :s AND status = 'failed' "
                "GROUP BY 1, 2, 3 ORDER BY count(*) DESC LIMIT 1"
            ),
            {"s": BIG},
        ).one()
    study = f"/studies/{quote(BIG)}"
    failures = urlencode({"kind": kind, "type": kind_type, "message": message})
    return [
        ("studies", "/"),
        ("studies fragment", "/fragments/studies"),
        ("study", study),
        ("study fragment (live)", f"{study}/fragment"),
        ("study, metric evaluation:mass", f"{study}?metric=evaluation%3Amass"),
        ("failure group's runs", f"{study}/failures?{failures}"),
        ("run", f"{study}/runs/{quote(run_id)}"),
        ("run fragment (live)", f"{study}/runs/{quote(run_id)}/fragment"),
    ]


def measure(url: str, requests: int, snapshot_s: float) -> list[dict[str, Any]]:
    import socket

    import uvicorn

    from orchestrator.contracts.settings import load_settings
    from orchestrator.dashboard.app import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(url, load_settings(dashboard_token="bench"), snapshot_s=snapshot_s)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    results = []
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for name, path in _pages(url):
            times = []
            size = 0
            for i in range(requests + 2):
                started = time.perf_counter()
                connection.request("GET", path)
                response = connection.getresponse()
                body = response.read()
                elapsed = (time.perf_counter() - started) * 1000
                if response.status != 200:
                    raise SystemExit(f"{path}: HTTP {response.status}: {body[:300]!r}")
                size = len(body)
                if i >= 2:
                    times.append(elapsed)
            results.append(
                {
                    "page": name,
                    "path": path,
                    "median_ms": statistics.median(times),
                    "min_ms": min(times),
                    "max_ms": max(times),
                    "kb": size / 1024,
                }
            )
            print(
                f"  {name:<32} {statistics.median(times):7.1f} ms  "
                f"[{min(times):.1f}-{max(times):.1f}]  {size / 1024:6.1f} KiB",
                flush=True,
            )
        connection.close()
    finally:
        server.should_exit = True
        thread.join(10)
    return results


def screenshot(url: str, path: Path) -> None:
    """The big study's page in headless Chromium (tests/browser.py), 1,400 pixels high."""
    import socket
    import tempfile

    import uvicorn

    sys.path.insert(0, str(ROOT / "tests"))
    from browser import Browser, outside

    from orchestrator.contracts.settings import load_settings
    from orchestrator.dashboard.app import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(url, load_settings(dashboard_token="bench"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        with tempfile.TemporaryDirectory() as profile:
            chromium = Browser(Path(profile))
            try:
                chromium.open(f"http://localhost:{port}/studies/{quote(BIG)}")
                assert chromium.console_errors() == [], chromium.console_errors()
                assert outside(chromium.requested_urls()) == []
                chromium.screenshot(path, height=1400)
            finally:
                chromium.quit()
        print(f"screenshot: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    finally:
        server.should_exit = True
        thread.join(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100_000, help="runs of the big study")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per page")
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--check", action="store_true", help="exit 1 when a page is slow")
    parser.add_argument("--screenshot", type=Path, default=None, help="save the study page")
    args = parser.parse_args()

    import tempfile

    from sqlalchemy import create_engine, text

    from orchestrator.store import upgrade

    name = f"studyq_bench_dashboard_{os.getpid()}"
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        upgrade(url)
        print(f"filling {name}: {STUDIES} studies, the big one of {args.runs:,} runs", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            fill(url, Path(folder), args.runs)
        from orchestrator.dashboard.app import SNAPSHOT_S

        results = []
        for label, snapshot_s in (
            ("the database read on every request (--snapshot-s 0)", 0.0),
            (f"as served: snapshots of at most {SNAPSHOT_S:g} s", SNAPSHOT_S),
        ):
            print(
                f"pages, {label} (median of {args.requests} requests, [min-max], size):",
                flush=True,
            )
            for result in measure(url, args.requests, snapshot_s):
                results.append({**result, "snapshot_s": snapshot_s})
        if args.screenshot:
            screenshot(url, args.screenshot)
    finally:
        if args.keep:
            print(f"kept: {url}")
        else:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    slow = []
    for snapshot_s in sorted({r["snapshot_s"] for r in results}):
        rows = [r for r in results if r["snapshot_s"] == snapshot_s]
        worst = max(rows, key=lambda r: r["median_ms"])
        over = [r for r in rows if r["median_ms"] >= GOAL_MS]
        slow += over if snapshot_s else []
        print(
            f"snapshot_s={snapshot_s:g}: slowest {worst['page']} {worst['median_ms']:.1f} ms; "
            f"goal < {GOAL_MS:.0f} ms median: "
            + ("met" if not over else f"missed by {len(over)} page(s)")
        )
    return 1 if args.check and slow else 0


if __name__ == "__main__":
    sys.exit(main())
