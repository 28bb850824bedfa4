"""``studyq report`` and the outcome table ``studyq run`` ends with: a real embedded study
(two search agents and a flaky one on the beam problem, some runs failing) is run into a
SQLite store, its report is opened in headless Chromium (plots drawn with one mark per datum,
no console error, no request off this machine), its Markdown summary and numbers are checked
against the runs themselves, and the 95 % interval against published t quantiles."""

from __future__ import annotations

import contextlib
import io
import math
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _services import ServiceSupplier
from browser import Browser, browser, outside
from cli_support import one_clear_line, run_main
from sqlalchemy import text

from orchestrator.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, build_parser, main
from orchestrator.insight.aggregates import finished_over_time, latency_histogram, read_insight
from orchestrator.insight.stats import summarize, t_quantile_975
from orchestrator.store import ResultStore
from orchestrator.store.engine import transaction

__all__ = ["browser"]  # the fixture, imported for pytest

STUDY_ID = "report-demo"
TITLE = 'Report demo <b>bold</b> & "quotes"'
STUDY = f"""\
study_id: {STUDY_ID}
title: '{TITLE}'
description: Two search strategies and a flaky agent on the beam problem.
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
problem_ids: [beam-design]
outcomes:
  - name: objective
    source_table: runs
    column: primary_outcome
    aggregation: mean
    primary: true
hypotheses:
  - hypothesis_id: h1-hill-climb
    label: Hill climbing finds lighter beams
    statement: Hill climbing returns lighter beams than random search.
    independent_vars: [agent]
    dependent_vars: [objective]
    direction: less
run_budget: {{replicates: 6}}
seed_policy: {{base_seed: 3}}
"""
CONDITIONS = 3
REPLICATES = 6
LABELS = [f"agent={agent}, fail_rate=0.5" for agent in ("random-search", "hill-climb", "flaky")]


@dataclass(frozen=True)
class Ran:
    url: str
    folder: Path
    code: int
    out: str


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """The study, run once for the module by ``studyq run`` (in this process)."""
    folder = tmp_path_factory.mktemp("report")
    study = folder / "study.yaml"
    study.write_text(STUDY, encoding="utf-8")
    url = f"sqlite:///{folder / 'store.db'}"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["run", str(study), "--db", url, "--jobs", "1", "--no-progress", "--no-export"])
    return Ran(url, folder, code, out.getvalue())


def _runs(url: str) -> list[object]:
    with ResultStore.open(url) as store:
        return list(store.iter_runs(STUDY_ID))


def _outcomes_by_label(url: str) -> dict[str, list[float]]:
    by_condition: dict[str, list[float]] = {}
    labels = dict(zip(("random-search", "hill-climb", "flaky"), LABELS, strict=True))
    for run in _runs(url):
        if run.status == "success" and isinstance(run.primary_outcome, int | float):  # type: ignore[attr-defined]
            label = labels[str(run.agent_key)]  # type: ignore[attr-defined]
            by_condition.setdefault(label, []).append(float(run.primary_outcome))  # type: ignore[attr-defined]
    return by_condition


# --- the 95 % interval ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("df", "published"),
    [
        (1, 12.706204736),
        (2, 4.302652730),
        (5, 2.570581836),
        (10, 2.228138852),
        (30, 2.042272456),
        (31, 2.039513446),
        (40, 2.021075390),
        (60, 2.000297822),
        (120, 1.979930405),
        (1000, 1.962339081),
    ],
)
def test_t_quantile_matches_published_values(df: int, published: float) -> None:
    # Given a published t(0.975, df) / When it is computed / Then they agree to 1e-7
    assert t_quantile_975(df) == pytest.approx(published, abs=1e-7)


def test_summary_from_sums_is_the_textbook_interval() -> None:
    # Given a sample with a known mean (5) and sample standard deviation (sqrt(32/7))
    values = [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]
    # When it is summarized from its count, sum and sum of squares, as SQL gives them
    s = summarize(len(values), sum(values), sum(v * v for v in values), minimum=2, maximum=9)
    # Then mean, std and the interval mean ± t(0.975, 7)·s/√n are the textbook ones
    std = math.sqrt(32 / 7)
    half = 2.364624252 * std / math.sqrt(8)
    assert s.n == 8 and s.mean == pytest.approx(5.0)
    assert s.std == pytest.approx(std)
    assert (s.ci_low, s.ci_high) == (pytest.approx(5 - half), pytest.approx(5 + half))
    # And one value has no spread, none has no mean, equal values have a zero-width interval
    assert summarize(1, 3.0, 9.0).ci_low is None and summarize(1, 3.0, 9.0).mean == 3.0
    assert summarize(0, None, None).mean is None
    flat = summarize(3, 0.3, 0.03, minimum=0.1, maximum=0.1)
    assert flat.std == 0.0 and flat.ci_low == flat.ci_high == pytest.approx(0.1)


# --- the end of `studyq run` ---------------------------------------------------------------


def test_run_ends_with_the_outcome_table_and_the_report_command(ran: Ran) -> None:
    # Given the study run by `studyq run` (the flaky agent fails some runs)
    assert ran.code == EXIT_FAILED, ran.out
    lines = ran.out.splitlines()
    # Then its output ends with the primary outcome by condition, the direction it is judged by
    start = next(i for i, line in enumerate(lines) if line.startswith("objective by condition"))
    assert "lower is better" in lines[start]
    rows = lines[start + 2 : start + 2 + CONDITIONS]
    for label, row in zip(LABELS, rows, strict=True):
        assert label in row, row
    # And each row's n and mean are those of the condition's successful runs
    outcomes = _outcomes_by_label(ran.url)
    for label, row in zip(LABELS, rows, strict=True):
        values = outcomes.get(label, [])
        n = int(row.split(label)[1].split()[0])
        assert n == len(values), row
        if values:
            assert f"{statistics.mean(values):.4g}" in row, row
    # And the condition with the lowest mean (lower is better) is the one marked
    best = min(
        (lbl for lbl in outcomes if outcomes[lbl]), key=lambda k: statistics.mean(outcomes[k])
    )
    marked = [row for row in rows if row.startswith("  *")]
    assert len(marked) == 1 and best in marked[0], rows
    best_line = next(line for line in lines if line.startswith(f"  * best: {best}"))
    # And it says how many other conditions' intervals overlap the best one's
    intervals = {}
    for label, values in outcomes.items():
        if len(values) > 1:
            s = summarize(len(values), sum(values), sum(v * v for v in values))
            intervals[label] = (s.ci_low, s.ci_high)
    low, high = intervals[best]
    overlaps = sum(1 for k, (a, b) in intervals.items() if k != best and a <= high and low <= b)
    assert (f"overlaps {overlaps} other" if overlaps else "overlaps no other") in best_line
    # And the command to open the report follows; a dashboard only once that command exists
    assert f"report:    studyq report {STUDY_ID} --db {ran.url} --out report.html" in lines
    has_dashboard = "dashboard" in build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert any(line.startswith("dashboard:") for line in lines) == has_dashboard


# --- the HTML report in a browser ----------------------------------------------------------


def test_report_opens_offline_with_its_plots_drawn(
    ran: Ran, browser: Browser, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the finished study
    outcomes = _outcomes_by_label(ran.url)
    sampled = sum(len(v) for v in outcomes.values())
    # When its report is written
    page = tmp_path / "out" / "report.html"
    code, out, err = run_main(["report", STUDY_ID, "--db", ran.url, "--out", str(page)], capsys)
    assert code == EXIT_OK, err
    assert f"{STUDY_ID}: wrote {page}" in out and "18 runs" in out
    html = page.read_text(encoding="utf-8")
    # Then it is one small file that needs nothing else: no script, no link, no remote source
    assert page.stat().st_size < 5 * 1024 * 1024
    assert (
        "<script" not in html
        and "<link" not in html
        and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    )
    # And opened in headless Chromium, the plots are drawn, one mark per datum
    browser.open_file(page)
    assert browser.count("svg[data-plot=outcome] g.strip") == CONDITIONS
    assert browser.count("svg[data-plot=outcome] .mark.point") == sampled
    with_values = sum(1 for v in outcomes.values() if v)
    with_ci = sum(1 for v in outcomes.values() if len(v) > 1)
    assert browser.count("svg[data-plot=outcome] .mark.mean") == with_values
    assert browser.count("svg[data-plot=outcome] .mark.ci") == with_ci
    assert browser.count("svg[data-plot=outcome] .best") == 1
    assert browser.count("svg[data-plot=completion] .mark.bar") == CONDITIONS
    totals = browser.script(
        "return [...document.querySelectorAll('svg[data-plot=completion] .mark.bar')]"
        ".map(b => Number(b.dataset.total))"
    )
    assert totals == [REPLICATES] * CONDITIONS
    assert browser.count("svg[data-plot=completion] .segment.failed") >= 1
    with ResultStore.open(ran.url) as store, transaction(store.engine, readonly=True) as c:
        hist = latency_histogram(c, STUDY_ID)
    assert hist is not None and sum(hist.counts) == 18
    assert browser.count("svg[data-plot=latency] .mark.bin") == len(hist.counts)
    assert browser.count("svg[data-plot=throughput] .mark.line") == 1
    assert browser.count("svg[data-plot=throughput] .mark.point") >= 1
    # And each SVG has a size on the page (it rendered, not just parsed)
    sizes = browser.script(
        "return [...document.querySelectorAll('svg.plot')].map(s => s.getBoundingClientRect())"
        ".map(r => r.width * r.height)"
    )
    assert len(sizes) == 4 and all(size > 10_000 for size in sizes)
    # And the study file's text is shown as text, escaped, never as markup
    assert browser.script("return document.querySelector('h1').textContent") == TITLE
    assert browser.count("h1 b") == 0
    # And the page logged no error and requested nothing but itself
    assert browser.console_errors() == []
    requested = browser.requested_urls()
    assert page.resolve().as_uri() in requested
    assert outside(requested) == []
    text = browser.script("return document.body.innerText")
    for part in ("Hypotheses", "h1-hill-climb", "FlakyAgentError", "Provenance", "studyq"):
        assert part in text, part
    browser.screenshot(tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_the_outside_check_catches_a_page_that_reaches_out(
    browser: Browser, tmp_path: Path
) -> None:
    # Given a page that loads an image from the internet and throws a script error
    page = tmp_path / "leaky.html"
    page.write_text(
        '<html><body><img src="https://example.com/pixel.png">'
        "<script>undefinedFunction()</script></body></html>",
        encoding="utf-8",
    )
    # When it is opened / Then the request and the error are both seen
    browser.open_file(page)
    assert outside(browser.requested_urls()) == ["https://example.com/pixel.png"]
    assert any("undefinedFunction" in error for error in browser.console_errors())


# --- Markdown, numbers, bad input ----------------------------------------------------------


def test_markdown_summary_has_the_outcome_table(
    ran: Ran, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # When the report is asked for as Markdown on stdout
    code, out, err = run_main(
        ["report", STUDY_ID, "--db", ran.url, "--format", "md", "--out", "-"], capsys
    )
    # Then it has the outcome table, a row per condition, the best one starred
    assert code == EXIT_OK, err
    assert "| condition | n | mean | std | 95 % CI | min | max |" in out
    rows = [line for line in out.splitlines() if "fail_rate=0.5 |" in line]
    assert len(rows) >= CONDITIONS
    assert sum(1 for row in rows if row.startswith("| ★ ")) == 2  # outcome and completion
    # And the design, hypotheses, failures grouped by type and the provenance
    for part in (
        "## Hypotheses",
        "h1-hill-climb",
        "## Failures",
        "FlakyAgentError",
        "## Provenance",
        "sqlalchemy",
    ):
        assert part in out, part
    # And without --out it writes report.md in the current folder
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["report", STUDY_ID, "--db", ran.url, "--format", "md"], capsys)
    assert code == EXIT_OK and Path("report.md").exists(), err


def test_the_aggregates_match_the_runs(ran: Ran) -> None:
    # Given the runs as the store holds them
    outcomes = _outcomes_by_label(ran.url)
    runs = _runs(ran.url)
    # When the read model aggregates them in SQL
    with ResultStore.open(ran.url) as store, transaction(store.engine, readonly=True) as c:
        insight = read_insight(c, STUDY_ID)
    assert insight is not None
    # Then each condition's n, mean, std and interval are those of its successful runs
    assert [g.label for g in insight.conditions] == LABELS
    for group in insight.conditions:
        values = outcomes.get(group.label, [])
        assert group.outcome.n == len(values)
        assert group.total == REPLICATES
        if len(values) > 1:
            mean, std = statistics.mean(values), statistics.stdev(values)
            half = t_quantile_975(len(values) - 1) * std / math.sqrt(len(values))
            assert group.outcome.mean == pytest.approx(mean)
            assert group.outcome.std == pytest.approx(std)
            assert group.outcome.ci_low == pytest.approx(mean - half)
            assert group.outcome.minimum == min(values) and group.outcome.maximum == max(values)
    # And failures are grouped by type, with an example run that failed that way
    failed = [r for r in runs if r.status == "failed"]  # type: ignore[attr-defined]
    assert sum(f.count for f in insight.failures) == len(failed) > 0
    by_id = {r.run_id: r for r in failed}  # type: ignore[attr-defined]
    for group in insight.failures:
        assert by_id[group.example_run_id].error_type == group.error_type  # type: ignore[attr-defined]
    # And totals, the time series and the workers account for every run
    assert insight.totals.runs == 18
    assert sum(n for _, n in insight.throughput.points) == 18
    assert sum(w.attempts for w in insight.workers) >= 18 and insight.worker_count >= 1
    assert insight.outcome.lower_is_better is True


def test_an_unknown_study_or_store_exits_2_and_writes_nothing(
    ran: Ran, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # When the report names a study the store does not hold
    out_file = tmp_path / "r.html"
    code, out, err = run_main(
        ["report", "no-such-study", "--db", ran.url, "--out", str(out_file)], capsys
    )
    # Then exit 2, one line naming the studies it holds, and no file
    assert code == EXIT_USAGE and out == ""
    one_clear_line(err, "no study 'no-such-study'", STUDY_ID)
    assert not out_file.exists()
    # And a store file that does not exist is not created
    missing = tmp_path / "nothing.db"
    code, out, err = run_main(
        ["report", STUDY_ID, "--db", f"sqlite:///{missing}", "--out", str(out_file)], capsys
    )
    assert code == EXIT_USAGE and not missing.exists() and not out_file.exists()
    one_clear_line(err, str(missing))
    # And --help ends with an example
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert re.search(r"example:\n  studyq report \S+ --out report.html\n$", capsys.readouterr().out)


# --- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture
def pg_db(services: ServiceSupplier) -> Iterator[str]:
    with services.pg_database("report", migrate=True) as url:
        yield url


@pytest.mark.integration
def test_report_on_postgresql(
    pg_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the same study run into PostgreSQL (JSONB outcomes, timestamptz)
    study = tmp_path / "study.yaml"
    study.write_text(STUDY, encoding="utf-8")
    argv = ["run", str(study), "--db", pg_db, "--jobs", "1", "--no-progress", "--no-export"]
    code, out, err = run_main(argv, capsys)
    assert code == EXIT_FAILED and "objective by condition" in out, err
    # When the Markdown report is built from it
    code, md, err = run_main(
        ["report", STUDY_ID, "--db", pg_db, "--format", "md", "--out", "-"], capsys
    )
    # Then the same figures come out of PostgreSQL's GROUP BYs
    assert code == EXIT_OK, err
    outcomes = _outcomes_by_label(pg_db)
    for label, values in outcomes.items():
        assert f"| {label} | {len(values)} | {statistics.mean(values):.4g} |" in md.replace(
            "| ★ ", "| "
        )
    with ResultStore.open(pg_db) as store, transaction(store.engine, readonly=True) as c:
        insight = read_insight(c, STUDY_ID)
    assert insight is not None
    assert sum(n for _, n in insight.throughput.points) == 18
    # And runs that ended in different minutes fall in whole-minute buckets, none lost
    with ResultStore.open(pg_db) as store, transaction(store.engine) as c:
        c.execute(
            text(
                "UPDATE runs SET ended_at = timestamptz '2026-01-01 00:00:00+00' "
                "+ (plan_index * interval '25 seconds') "
                "WHERE study_id = :s AND ended_at IS NOT NULL"
            ),
            {"s": STUDY_ID},
        )
    with ResultStore.open(pg_db) as store, transaction(store.engine, readonly=True) as c:
        spread = finished_over_time(c, STUDY_ID)
    assert spread.bucket_s == 60 and sum(n for _, n in spread.points) == 18
    assert all(when.second == 0 for when, _ in spread.points)
    assert [n for _, n in spread.points][:2] == [3, 2]  # 0, 25, 50 s; then 75, 100 s
    assert insight.latency is not None and sum(insight.latency.counts) == 18
    assert sum(len(v) for v in insight.samples.values()) == sum(len(v) for v in outcomes.values())
    page = tmp_path / "report.html"
    code, out, err = run_main(["report", STUDY_ID, "--db", pg_db, "--out", str(page)], capsys)
    assert code == EXIT_OK and page.read_text(encoding="utf-8").count('class="mark bar"') == 3


# --- before any run, without a direction, many conditions ------------------------------------


def test_a_study_not_run_yet_has_a_report_with_nothing_drawn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a study registered in a store but not run, whose hypothesis declares no direction
    from orchestrator.embedded import register
    from orchestrator.study.plan import prepare

    study = tmp_path / "study.yaml"
    study.write_text(STUDY.replace("    direction: less\n", ""), encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with ResultStore.open(url) as store:
        register(store, prepare(study))
    # When the report and the outcome table are built
    page = tmp_path / "report.html"
    code, _, err = run_main(["report", STUDY_ID, "--db", url, "--out", str(page)], capsys)
    assert code == EXIT_OK, err
    html = page.read_text(encoding="utf-8")
    from orchestrator.insight.summary import print_outcome_table

    table = io.StringIO()
    print_outcome_table(STUDY_ID, db=url, out=table)
    # Then nothing is drawn, every condition's bar counts its planned runs, and no
    # condition is marked best, for the reason the study gives
    assert html.count('class="mark point"') == 0 and "no outcome values yet" in html
    assert html.count('class="mark bar"') == CONDITIONS
    assert f'data-total="{REPLICATES}"' in html
    assert "No condition is marked best: the study declares no direction for it." in html
    lines = table.getvalue().splitlines()
    assert "direction not declared" in lines[0]
    assert not any(line.startswith("  *") for line in lines)
    assert "  no condition marked best: the study declares no direction for it" in lines


def test_the_outcome_table_shows_twelve_conditions_and_counts_the_rest() -> None:
    # Given 15 conditions' summaries, higher is better
    from orchestrator.insight.aggregates import GroupSummary, OutcomeRef
    from orchestrator.insight.summary import outcome_table
    from orchestrator.store.inspection import MetricRef

    groups = [
        GroupSummary(
            key=f"c{i}",
            label=f"level={i}",
            counts={"success": 2},
            outcome=summarize(2, 2.0 * i, 2.0 * i * i + 0.02),
            mean_latency_s=None,
            cost_usd=0.0,
            position=i,
        )
        for i in range(15)
    ]
    outcome = OutcomeRef("score", MetricRef("column", "primary_outcome"), False, "h says so")
    # When the table is drawn
    lines = outcome_table(groups, outcome)
    # Then 12 rows, a line for the other 3, and the best (highest mean) named though not shown
    assert "higher is better" in lines[0]
    assert sum(1 for line in lines if "level=" in line and "best" not in line) == 12
    assert "    ... 3 more conditions (the report lists all)" in lines
    assert lines[-1].startswith("  * best: level=14 (highest mean; h says so)")
