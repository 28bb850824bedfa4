"""``studyq dashboard``: a real sweep on the test PostgreSQL, the dashboard served by a real
uvicorn on a free 127.0.0.1 port, every page opened in headless Chromium.

A study of two search agents and a flaky one on two problems (some runs fail) is run into a
throwaway PostgreSQL database by ``studyq run`` (in this process). Then:

* every page renders that data: plots drawn with one mark per datum, the numbers those of the
  store, no console error, no request off this machine;
* the live part of a page is swapped in place (no reload) as more runs of a study finish;
* resubmit and cancel: 401 without the token and with a wrong one (nothing changes); with
  it, the failed runs are queued again in the store and their messages are on the Redis
  queue, and cancel marks the queued runs cancelled;
* an unknown study or run is a 404 page, a database that is down a 503 page, never a
  traceback; a dashboard without a token is read-only;
* the command: ``studyq dashboard`` serves the pages, warns on a public address without a
  token, and a missing extra or a port in use is one line, exit 2.
"""

from __future__ import annotations

import bisect
import contextlib
import html
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import redis
from _services import ServiceSupplier, forget_redis_queue, redis_url
from browser import Browser, browser, outside
from cli_support import one_clear_line, run_main

from orchestrator.budget import budget_state
from orchestrator.cli import EXIT_USAGE, main
from orchestrator.contracts.settings import load_settings
from orchestrator.store import ResultStore
from orchestrator.store.records import RunRecord

__all__ = ["browser"]  # the fixture, imported for pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from orchestrator.dashboard.app import create_app  # noqa: E402

REDIS_DB = 13
"""This suite's Redis database (tests/_services.py's REDIS_DBS uses 12, 14 and 15)."""
QUEUE = f"dash-{os.getpid()}"
"""The demo study's queue: this session's own, as another session may share the database."""
TOKEN = "dash-secret-token"
STUDY_ID = "dash-demo"
LIVE_ID = "dash-live"

STUDY = """\
study_id: {study_id}
title: Dashboard demo
description: Two search strategies and a flaky agent on two design problems.
factors:
  - name: agent
    kind: manipulated
    levels:
      - {{name: random, value: random-search}}
      - {{name: hill_climb, value: hill-climb}}
      - {{name: flaky, value: flaky}}
  - name: fail_rate
    levels:
      - {{name: half, value: 0.5}}
problem_ids: [beam-design, spring-design]
outcomes:
  - name: objective
    source_table: runs
    column: primary_outcome
    aggregation: mean
    primary: true
hypotheses:
  - hypothesis_id: h1
    label: Hill climbing finds lighter designs
    statement: Hill climbing returns lighter designs than random search.
    independent_vars: [agent]
    dependent_vars: [objective]
    direction: less
run_budget: {{replicates: {replicates}}}
seed_policy: {{base_seed: 3}}
execution: {{queue: {queue}}}
"""
CONDITIONS = 3
RUNS = CONDITIONS * 2 * 4
BUDGET_ID = "dash-budget"
BUDGET_QUEUE = f"dash-budget-{os.getpid()}"
COST_USD = 0.01


def paid(seed: int) -> dict[str, object]:
    """The budget study's agent (bound as ``test_dashboard:paid``): a call costing $0.01."""
    return {"output": {"seed": seed}, "metrics": {"cost_usd": COST_USD, "input_tokens": 3}}


def _run(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


@dataclass(frozen=True)
class Sweep:
    url: str
    folder: Path


@pytest.fixture(scope="module")
def sweep(services: ServiceSupplier, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    """The demo study, run once into a fresh PostgreSQL database by ``studyq run``."""
    folder = tmp_path_factory.mktemp("dashboard")
    study = folder / "study.yaml"
    study.write_text(STUDY.format(study_id=STUDY_ID, replicates=4, queue=QUEUE), encoding="utf-8")
    with services.pg_database("dashboard", migrate=True) as url:
        argv = ["run", str(study), "--db", url, "--jobs", "2", "--no-progress", "--no-export"]
        assert _run(argv) in (0, 1)
        yield Sweep(url, folder)


def _runs(url: str, study_id: str = STUDY_ID) -> list[RunRecord]:
    with ResultStore.open(url) as store:
        return list(store.iter_runs(study_id))


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def _served(db_url: str, *, token: str | None, broker: str | None = None) -> Iterator[str]:
    """The dashboard app on a real uvicorn in a thread; yields its base URL (``localhost``:
    the test browser resolves no other name, and 127.0.0.1 is where uvicorn listens)."""
    settings = load_settings(dashboard_token=token)
    app = create_app(db_url, settings, broker=broker)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://localhost:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def site(sweep: Sweep, services: ServiceSupplier) -> Iterator[str]:
    """The dashboard of the sweep, with actions on (token) and the suite's Redis broker."""
    client = services.redis(REDIS_DB)
    try:
        with _served(sweep.url, token=TOKEN, broker=redis_url(REDIS_DB)) as base:
            yield base
    finally:
        for queue in (QUEUE, BUDGET_QUEUE):
            forget_redis_queue(client, queue)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, html.unescape(response.read().decode())
    except urllib.error.HTTPError as error:
        return error.code, html.unescape(error.read().decode())


def _post(
    url: str, fields: dict[str, str], headers: dict[str, str] | None = None
) -> tuple[int, str]:
    request = urllib.request.Request(
        url,
        data=urllib.parse.urlencode(fields).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, html.unescape(response.read().decode())
    except urllib.error.HTTPError as error:
        return error.code, html.unescape(error.read().decode())


def _clean(chromium: Browser) -> None:
    """The page made no console error and no request off this machine."""
    assert chromium.console_errors() == []
    assert outside(chromium.requested_urls()) == []


def _minutes(moments: list[datetime]) -> int:
    """Time buckets of a minute from the first to the last moment (the throughput series)."""
    stamps = [int(m.timestamp()) // 60 for m in moments]
    return max(stamps) - min(stamps) + 1


# -- pages -------------------------------------------------------------------------------------


def test_studies_page_lists_the_study_with_its_counts(
    site: str, sweep: Sweep, browser: Browser
) -> None:
    # Given the sweep's runs in the store
    runs = _runs(sweep.url)
    failed = sum(r.status == "failed" for r in runs)
    # When the studies page is opened
    browser.open(site + "/")
    # Then the study's row shows its runs, successes and failures as the store has them
    row = f"tr.study[data-study='{STUDY_ID}']"
    assert browser.count(row) == 1
    cell = (
        "return document.querySelector(arguments[0] + ' [data-count=' + arguments[1] + ']')"
        ".textContent"
    )
    assert browser.script(cell, row, "runs") == str(RUNS)
    assert browser.script(cell, row, "failed") == str(failed) and failed > 0
    assert browser.script(cell, row, "success") == str(RUNS - failed)
    _clean(browser)


def test_study_page_draws_every_plot_with_one_mark_per_datum(
    site: str, sweep: Sweep, browser: Browser, tmp_path: Path
) -> None:
    # Given the sweep's runs: successful ones with a numeric outcome, finished ones' end times
    runs = _runs(sweep.url)
    valued = [
        r for r in runs if r.status == "success" and isinstance(r.primary_outcome, int | float)
    ]
    with_mean = {r.condition_id for r in valued}
    with_ci = {c for c in with_mean if sum(r.condition_id == c for r in valued) > 1}
    finished = [r.ended_at for r in runs if r.status in ("success", "failed") and r.ended_at]
    costed = [r.ended_at for r in runs if r.cost_usd and r.ended_at]  # none: demo agents
    # When the study page is opened
    browser.open(f"{site}/studies/{STUDY_ID}")
    # Then the outcome strip plot has a dot per valued run (under the sample cap), a mean per
    # condition with values and a whisker per condition with two or more
    assert browser.count("svg[data-plot=outcome] .mark.point") == len(valued) > 0
    assert browser.count("svg[data-plot=outcome] .mark.mean") == len(with_mean)
    assert browser.count("svg[data-plot=outcome] .mark.ci") == len(with_ci)
    # And completion has a bar per condition; latency a bin per 1-2-5 step from the fastest
    # finished run's to the slowest's, holding every finished run; progress a point per minute
    assert browser.count("svg[data-plot=completion] .mark.bar") == CONDITIONS
    latencies = [r.latency_s for r in runs if r.status in ("success", "failed") and r.latency_s]
    edges = [m * 10.0**e for e in range(-3, 6) for m in (1, 2, 5)]
    steps = [bisect.bisect_right(edges, latency) for latency in latencies]
    assert browser.count("svg[data-plot=latency] .mark.bin") == max(steps) - min(steps) + 1
    held = browser.script(
        "return [...document.querySelectorAll('svg[data-plot=latency] .mark.bin title')]"
        ".map(t => +t.textContent.split(': ').pop().replace(/,/g, ''))"
    )
    assert sum(held) == len(latencies)
    assert browser.count("svg[data-plot=throughput] .mark.point") == _minutes(finished)
    assert browser.count("svg[data-plot=throughput] .mark.line") == 1
    assert browser.count("svg[data-plot=cost] .mark.point") == (_minutes(costed) if costed else 0)
    # And the tables: a row per condition, agent and problem; failures link to failed runs
    assert browser.count("table.condition tr.group") == CONDITIONS
    assert browser.count("table.agent tr.group") == 3
    assert browser.count("table.problem tr.group") == 2
    groups = {(r.error_kind, r.error_type, r.error_message) for r in runs if r.status == "failed"}
    assert browser.count("table.failures tr.failure") == len(groups)
    counts = browser.script(
        "return [...document.querySelectorAll('table.failures a.runs-link')]"
        ".map(a => +a.textContent)"
    )
    assert sum(counts) == sum(r.status == "failed" for r in runs)
    # And the actions are offered (this dashboard has a token), each asking for it
    assert browser.count("form.action input[name=token]") == 3  # resubmit, cancel, budget
    _clean(browser)
    # (README's picture is bench/dashboard.py --screenshot: the page of a 100,000-run study)
    shot = browser.screenshot(tmp_path / "dashboard.png")
    assert shot.stat().st_size < 300_000


def test_choosing_an_evaluation_metric_redraws_the_outcome_plot_in_place(
    site: str, sweep: Sweep, browser: Browser
) -> None:
    # Given the study page, marked so a reload would show
    browser.open(f"{site}/studies/{STUDY_ID}")
    browser.script("window.__kept = 'same page'")
    with ResultStore.open(sweep.url) as store:
        masses = {
            e.index
            for e in store.iter_evaluations(STUDY_ID)
            if e.metric_name == "mass" and isinstance(e.metric_value, int | float)
        }
    succeeded = {r.index for r in _runs(sweep.url) if r.status == "success"}
    # When the evaluation metric "mass" is chosen in the select
    browser.script(
        "const s = document.getElementById('metric'); s.value = 'evaluation:mass';"
        "s.dispatchEvent(new Event('change'));"
    )
    deadline = time.monotonic() + 10
    caption = ""
    while time.monotonic() < deadline:
        caption = browser.script(
            "return document.querySelector('svg[data-plot=outcome] title').textContent"
        )
        if caption.startswith("evaluation mass"):
            break
        time.sleep(0.1)
    # Then the plot shows a dot per successful run with a mass, without a reload
    assert caption.startswith("evaluation mass"), caption
    assert browser.count("svg[data-plot=outcome] .mark.point") == len(masses & succeeded) > 0
    assert browser.script("return window.__kept") == "same page"
    assert browser.script("return location.search") == "?metric=evaluation%3Amass"
    _clean(browser)


def test_run_page_shows_the_spec_attempts_result_and_evaluations(
    site: str, sweep: Sweep, browser: Browser
) -> None:
    # Given a successful run and a failed one of the sweep
    runs = _runs(sweep.url)
    ok = next(r for r in runs if r.status == "success")
    bad = next(r for r in runs if r.status == "failed")
    with ResultStore.open(sweep.url) as store:
        evaluations = [e for e in store.iter_evaluations(STUDY_ID) if e.index == ok.index]
    # When each run's page is opened
    browser.open(f"{site}/studies/{STUDY_ID}/runs/{ok.run_id}")
    # Then it shows its ids, seed, assignments, status, attempts and evaluations
    text = browser.script("return document.querySelector('main').innerText")
    for part in (
        ok.run_id,
        ok.condition_id,
        str(ok.seed),
        "agent=random-search" if ok.agent_key == "random-search" else ok.agent_key,
        ok.problem_key,
    ):
        assert part in text
    assert (
        browser.script("return document.querySelector('[data-field=status]').textContent")
        == "success"
    )
    assert browser.count("table.attempts tbody tr") == ok.attempts_used
    assert browser.count("table.evaluations tbody tr") == len(evaluations) > 0
    _clean(browser)
    browser.open(f"{site}/studies/{STUDY_ID}/runs/{bad.run_id}")
    text = browser.script("return document.querySelector('main').innerText")
    assert "failed" in text and str(bad.error_type) in text
    _clean(browser)


def test_a_failure_group_links_to_its_failed_runs(
    site: str, sweep: Sweep, browser: Browser
) -> None:
    # Given the largest failure group on the study page
    runs = _runs(sweep.url)
    browser.open(f"{site}/studies/{STUDY_ID}")
    href = browser.script("return document.querySelector('table.failures a.runs-link').href")
    count = int(
        browser.script("return document.querySelector('table.failures a.runs-link').textContent")
    )
    # When its link is followed
    browser.open(href)
    # Then it lists exactly that many failed runs, each linking to its run page
    listed = browser.script(
        "return [...document.querySelectorAll('table.failed-runs a.run-link')]"
        ".map(a => a.textContent)"
    )
    failed = {r.run_id for r in runs if r.status == "failed"}
    assert len(listed) == count and set(listed) <= failed
    _clean(browser)


def test_live_part_updates_in_place_as_more_runs_finish(
    site: str, sweep: Sweep, browser: Browser
) -> None:
    # Given a second study of which only 3 runs have run so far
    study = sweep.folder / "live.yaml"
    study.write_text(STUDY.format(study_id=LIVE_ID, replicates=2, queue=QUEUE), encoding="utf-8")
    base = ["run", str(study), "--db", sweep.url, "--jobs", "1", "--no-progress", "--no-export"]
    _run([*base, "--limit", "3"])
    browser.open(f"{site}/studies/{LIVE_ID}")
    browser.script("window.__kept = 'same page'")

    def finished() -> int:
        return int(
            browser.script(
                "const q = s => "
                "+document.querySelector('#live [data-count=' + s + ']').textContent;"
                "return q('success') + q('failed');"
            )
        )

    assert finished() == 3
    # When the rest of its runs finish (a second studyq run)
    _run(base)
    total = len(_runs(sweep.url, LIVE_ID))
    deadline = time.monotonic() + 15
    while finished() < total and time.monotonic() < deadline:
        time.sleep(0.2)
    # Then the page shows them all, swapped in by the live refresh, not by a reload
    assert finished() == total == CONDITIONS * 2 * 2
    assert browser.script("return window.__kept") == "same page"
    assert int(browser.script("return document.getElementById('live').dataset.refreshes")) >= 1
    _clean(browser)


def test_study_page_on_a_sqlite_store(tmp_path: Path) -> None:
    # Given the demo study run into an embedded SQLite store
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.format(study_id=STUDY_ID, replicates=2, queue=QUEUE), encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    _run(["run", str(study), "--db", url, "--jobs", "1", "--no-progress", "--no-export"])
    runs = _runs(url)
    valued = [r for r in runs if r.status == "success" and isinstance(r.primary_outcome, float)]
    finished = [r for r in runs if r.status in ("success", "failed")]
    # When its study page is served
    with _served(url, token=None) as base:
        status, body = _get(f"{base}/studies/{STUDY_ID}")
    # Then the same plots are drawn from SQLite's GROUP BYs: a dot per valued run, a bar per
    # condition, every finished run in a latency bin
    assert status == 200
    outcome = re.search(r'<svg[^>]*data-plot="outcome".*?</svg>', body, re.S)
    assert outcome and outcome.group(0).count('class="mark point"') == len(valued) > 0
    assert body.count('class="mark bar"') == CONDITIONS
    latency = re.search(r'<svg[^>]*data-plot="latency".*?</svg>', body, re.S)
    assert latency
    held = [int(n.replace(",", "")) for n in re.findall(r": ([\d,]+)</title></rect>", latency[0])]
    assert sum(held) == len(finished)


# -- actions -----------------------------------------------------------------------------------


def _statuses(url: str) -> dict[str, int]:
    return _statuses_of(url, STUDY_ID)


def _statuses_of(url: str, study_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in _runs(url, study_id):
        counts[run.status] = counts.get(run.status, 0) + 1
    return counts


@pytest.mark.parametrize("action", ["resubmit", "cancel", "budget"])
@pytest.mark.parametrize(
    ("fields", "headers"),
    [
        ({"max_cost_usd": "9"}, {}),
        ({"token": "wrong-token", "max_cost_usd": "9"}, {}),
        ({"max_cost_usd": "9"}, {"Authorization": "Bearer wrong-token"}),
    ],
    ids=["no-token", "wrong-form-token", "wrong-bearer"],
)
def test_actions_without_the_right_token_are_401_and_change_nothing(
    site: str, sweep: Sweep, action: str, fields: dict[str, str], headers: dict[str, str]
) -> None:
    # Given the store's statuses and the queue's length
    before = _statuses(sweep.url)
    queue = redis.Redis.from_url(redis_url(REDIS_DB))
    queued_before = queue.llen(QUEUE)
    # When an action is posted without the token, or with a wrong one
    status, body = _post(f"{site}/studies/{STUDY_ID}/{action}", fields, headers)
    # Then it is a 401 page naming the fix, and neither the store nor the queue changed
    assert status == 401
    assert "401" in body and "STUDYQ_DASHBOARD_TOKEN" in body and "Traceback" not in body
    assert _statuses(sweep.url) == before
    assert queue.llen(QUEUE) == queued_before


def test_resubmit_then_cancel_with_the_token(site: str, sweep: Sweep, browser: Browser) -> None:
    # Given the failed runs of one error class, and an empty queue
    runs = _runs(sweep.url)
    flaky = [r for r in runs if r.status == "failed" and r.error_type == "FlakyAgentError"]
    failed = [r for r in runs if r.status == "failed"]
    assert flaky and len(flaky) < len(failed)
    queue = redis.Redis.from_url(redis_url(REDIS_DB))
    queue.delete(QUEUE)
    # When that class is resubmitted through the page's form, with the token
    browser.open(f"{site}/studies/{STUDY_ID}")
    browser.script(
        "const f = document.querySelector('form.action[action$=resubmit]');"
        "f.error_class.value = 'FlakyAgentError'; f.token.value = arguments[0]; f.submit();",
        TOKEN,
    )
    deadline = time.monotonic() + 20
    while not browser.count("section.done") and time.monotonic() < deadline:
        time.sleep(0.1)
    # Then the page says so, the store has those runs queued again and the queue holds them
    message = browser.script("return document.querySelector('section.done .message').textContent")
    assert message.startswith(f"{len(flaky)} failed runs")
    statuses = {r.run_id: r.status for r in _runs(sweep.url)}
    assert {statuses[r.run_id] for r in flaky} == {"queued"}
    assert {statuses[r.run_id] for r in failed if r not in flaky} == {"failed"}
    assert queue.llen(QUEUE) == len(flaky)
    _clean(browser)
    # When the study is cancelled with the token as a Bearer header
    status, body = _post(
        f"{site}/studies/{STUDY_ID}/cancel", {}, {"Authorization": f"Bearer {TOKEN}"}
    )
    # Then the queued runs are cancelled in the store (a worker would find nothing to claim)
    assert status == 200 and f"{len(flaky)} runs cancelled" in body
    statuses = {r.run_id: r.status for r in _runs(sweep.url)}
    assert {statuses[r.run_id] for r in flaky} == {"cancelled"}


@pytest.fixture(scope="module")
def budget_study(sweep: Sweep) -> str:
    """A study of 300 paid runs ($0.01 each) with execution.max_cost_usd 0.03: `studyq run`
    stops dispatch once $0.03 is spent (the runs it already claimed, a batch of 256, still
    finish), the rest waiting (planned)."""
    path = sweep.folder / "budget.json"
    path.write_text(
        json.dumps(
            {
                "study_id": BUDGET_ID,
                "title": "A study its budget stopped",
                "agent_specs": ["paid"],
                "problem_ids": ["noop"],
                "run_budget": {"replicates": 300},
                "bindings": {"agents": {"paid": "test_dashboard:paid"}},
                "execution": {"queue": BUDGET_QUEUE, "max_cost_usd": 0.03},
            }
        ),
        encoding="utf-8",
    )
    _run(["run", str(path), "--db", sweep.url, "--jobs", "1", "--no-progress", "--no-export"])
    return BUDGET_ID


def test_raising_the_budget_continues_the_study_and_publishes_its_waiting_runs(
    site: str, sweep: Sweep, budget_study: str, browser: Browser
) -> None:
    # Given a study its budget stopped: some runs done ($0.03 or more spent), the rest
    # waiting, none queued
    before = {s: n for s, n in _statuses_of(sweep.url, budget_study).items() if n}
    done, waiting = before.get("success", 0), before.get("planned", 0)
    assert before == {"success": done, "planned": waiting} and done >= 3 and waiting > 0
    assert budget_state(budget_study, db=sweep.url).pause is not None
    queue = redis.Redis.from_url(redis_url(REDIS_DB))
    assert queue.llen(BUDGET_QUEUE) == 0
    browser.open(f"{site}/studies/{budget_study}")
    assert browser.count("p.paused") == 1
    paid_ends = [r.ended_at for r in _runs(sweep.url, budget_study) if r.cost_usd and r.ended_at]
    assert browser.count("svg[data-plot=cost] .mark.point") == _minutes(paid_ends)
    # When a budget not above what is spent is posted / Then a 400 page says so, nothing changes
    status, body = _post(
        f"{site}/studies/{budget_study}/budget", {"token": TOKEN, "max_cost_usd": "0.02"}
    )
    assert status == 400 and "not above" in body and "Traceback" not in body
    assert budget_state(budget_study, db=sweep.url).limits.max_cost_usd == pytest.approx(0.03)
    # When the budget is raised to $10 through the page's form, with the token
    browser.script(
        "const f = document.querySelector('form.action[action$=budget]');"
        "f.max_cost_usd.value = '10'; f.token.value = arguments[0]; f.submit();",
        TOKEN,
    )
    deadline = time.monotonic() + 20
    while not browser.count("section.done") and time.monotonic() < deadline:
        time.sleep(0.1)
    # Then the store has the new limit and no pause, and the waiting runs are on the queue
    message = browser.script("return document.querySelector('section.done .message').textContent")
    assert "max cost $10.00" in message and f"{waiting} waiting runs published again" in message
    state = budget_state(budget_study, db=sweep.url)
    assert state.limits.max_cost_usd == pytest.approx(10.0) and state.pause is None
    assert {s: n for s, n in _statuses_of(sweep.url, budget_study).items() if n} == {
        "success": done,
        "queued": waiting,
    }
    assert queue.llen(BUDGET_QUEUE) == waiting
    _clean(browser)


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/studies/no-such-study", "There is no study 'no-such-study'"),
        (f"/studies/{STUDY_ID}/runs/run-nope", "There is no run 'run-nope'"),
        ("/studies/no-such-study/runs/run-nope", "There is no run 'run-nope'"),
        ("/no/such/page", "There is no page at /no/such/page"),
    ],
    ids=["study", "run", "run-of-unknown-study", "path"],
)
def test_unknown_study_run_or_path_is_a_404_page(
    site: str, browser: Browser, path: str, words: str
) -> None:
    # When an unknown study, run or path is asked for
    status, body = _get(site + path)
    # Then it is a 404 page saying what is missing, never a traceback
    assert status == 404 and words in body and "Traceback" not in body
    browser.open(site + path)
    assert browser.script(
        "return document.querySelector('section.error h1').textContent"
    ).startswith("404")
    assert outside(browser.requested_urls()) == []


def test_a_database_that_is_down_is_a_503_page(browser: Browser) -> None:
    # Given a dashboard on a PostgreSQL port nothing listens on
    with _served("postgresql://postgres@127.0.0.1:1/studyq", token=TOKEN) as base:
        for path in ("/", f"/studies/{STUDY_ID}", "/fragments/studies"):
            # When a page is asked for
            status, body = _get(base + path)
            # Then it is a 503 page naming the (masked) database, never a traceback
            assert status == 503, path
            assert "cannot be reached" in body and "127.0.0.1:1" in body
            assert "Traceback" not in body
        browser.open(base + "/")
        heading = browser.script("return document.querySelector('section.error h1').textContent")
        assert heading.startswith("503")


def test_without_a_token_the_dashboard_is_read_only(sweep: Sweep, browser: Browser) -> None:
    # Given a dashboard started without STUDYQ_DASHBOARD_TOKEN
    before = _statuses(sweep.url)
    with _served(sweep.url, token=None) as base:
        # When the study page is opened and an action posted (even with a token)
        browser.open(f"{base}/studies/{STUDY_ID}")
        status, body = _post(f"{base}/studies/{STUDY_ID}/cancel", {"token": TOKEN})
    # Then no action is offered, the post is refused with 401, and nothing changed
    assert browser.count("form.action") == 0 and browser.count("p.readonly") == 1
    assert status == 401 and "read-only" in body
    assert _statuses(sweep.url) == before
    _clean(browser)


# -- the command -------------------------------------------------------------------------------


def test_command_serves_the_pages_and_warns_on_a_public_address(sweep: Sweep) -> None:
    # Given `studyq dashboard` on all addresses without a token
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDYQ_")}
    studyq = shutil.which("studyq", path=str(Path(sys.executable).parent)) or "studyq"
    process = subprocess.Popen(
        [
            studyq,
            "dashboard",
            STUDY_ID,
            "--db",
            sweep.url,
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        status = 0
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status, body = _get(f"http://127.0.0.1:{port}/studies/{STUDY_ID}")
                break
            time.sleep(0.1)
        # Then it serves the study page
        assert status == 200 and STUDY_ID in body
    finally:
        process.terminate()
        out, err = process.communicate(timeout=20)
    # And it warned that it is read-only on a public address, and printed the study's URL
    assert re.search(r"warning: listening on 0\.0\.0\.0 without STUDYQ_DASHBOARD_TOKEN", err)
    assert f"http://0.0.0.0:{port}/studies/{STUDY_ID}" in out and "read-only" in out


def test_command_without_the_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given starlette is not importable (the dashboard extra is not installed)
    monkeypatch.setitem(sys.modules, "starlette", None)
    # When the dashboard is started / Then one line names the extra, exit 2
    code, out, err = run_main(["dashboard", "--db", "sqlite:///nothing.db"], capsys)
    assert code == EXIT_USAGE and out == ""
    one_clear_line(err, "starlette", "pip install 'studyq[dashboard]'")


def test_command_on_a_port_in_use_or_a_missing_store_is_one_line(
    sweep: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a port something already listens on
    with contextlib.closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # When the dashboard is started on it / Then one line with the fix, exit 2
        code, _out, err = run_main(["dashboard", "--db", sweep.url, "--port", str(port)], capsys)
    assert code == EXIT_USAGE
    one_clear_line(err, f"127.0.0.1:{port}", "--port")
    # And a SQLite store that does not exist is refused, not created
    missing = tmp_path / "nothing.db"
    code, _out, err = run_main(["dashboard", "--db", f"sqlite:///{missing}"], capsys)
    assert code == EXIT_USAGE and not missing.exists()
    one_clear_line(err, str(missing), "--db")
