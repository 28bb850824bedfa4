"""The audit every fault test ends with, written once.

:func:`audit` checks a finished sweep in the store against its fault-free reference and
raises one ``AssertionError`` that lists every problem it found:

* **no lost run**: every planned run is in ``runs`` once and ``success`` (or, when the test
  expects failures, exactly that many are ``failed``);
* **no duplicate result**: one ``runs`` row per ``(study, plan_index)``, one ``success``
  attempt per successful run, and per run exactly as many ``evaluations`` and ``events``
  rows as the fault-free run wrote, all from the run's final attempt;
* **bounded retries**: per run, the charged attempts in ``run_attempts`` (every outcome but
  ``released``) and ``attempts_used`` are at most ``max_attempts``, the run's ``attempt`` is
  its newest attempt row, and no attempt is left ``running``;
* **same artifacts**: the canonical CSVs exported from the store equal the reference's once
  what legitimately differs between two executions is dropped (timestamps, latencies, worker
  and host provenance, ``manifest_path``), rows sorted by ``run_id``; ``manifest.json``
  agrees on the counts.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text

from orchestrator.export import export_artifacts
from orchestrator.store import ResultStore

VOLATILE_COLUMNS = frozenset(
    {
        "start_time",
        "end_time",
        "latency_s",
        "manifest_path",
        "timestamp",
        "worker",
        "host",
        "hostname",
        "pid",
    }
)
"""Columns that differ between two correct executions of one study."""

CSV_FILES = ("runs.csv", "evaluations.csv", "events.csv", "conditions.csv")
SAME_FILES = ("hypotheses.json", "analysis_plan.json")


@dataclass
class Audit:
    """What the audit saw (for tests that assert more) and the problems it found."""

    study_id: str
    planned: int
    counts: dict[str, int] = field(default_factory=dict)
    attempts_per_run: dict[int, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def retried_runs(self) -> int:
        return sum(1 for count in self.attempts_per_run.values() if count > 1)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def normalized(path: Path) -> list[dict[str, str]]:
    """A CSV's rows without the volatile columns, sorted by ``run_id`` (then every value)."""
    rows = [
        {key: value for key, value in row.items() if key not in VOLATILE_COLUMNS}
        for row in read_csv(path)
    ]
    return sorted(rows, key=lambda row: (row.get("run_id", ""), sorted(row.items())))


def compare_artifacts(actual: Path, reference: Path) -> list[str]:
    """Differences between two exported artifact folders, as readable lines."""
    problems: list[str] = []
    for name in CSV_FILES:
        got, want = normalized(actual / name), normalized(reference / name)
        if got == want:
            continue
        if len(got) != len(want):
            problems.append(f"{name}: {len(got)} rows, the fault-free run has {len(want)}")
        got_columns = list(got[0]) if got else []
        want_columns = list(want[0]) if want else []
        if got_columns != want_columns:
            problems.append(f"{name}: columns {got_columns} != fault-free {want_columns}")
        shown = 0
        for index, (row, expected) in enumerate(zip(got, want, strict=False)):
            if row != expected and shown < 3:
                delta = {
                    key: (row.get(key), expected.get(key))
                    for key in {*row, *expected}
                    if row.get(key) != expected.get(key)
                }
                problems.append(f"{name}: sorted row {index} differs (got, fault-free): {delta}")
                shown += 1
    for name in SAME_FILES:
        if (actual / name).read_text() != (reference / name).read_text():
            problems.append(f"{name} differs from the fault-free run's")
    got_manifest = json.loads((actual / "manifest.json").read_text())
    want_manifest = json.loads((reference / "manifest.json").read_text())
    for key in ("study_id", "status_counts", "run_count", "partial", "runs_planned"):
        if got_manifest.get(key) != want_manifest.get(key):
            problems.append(
                f"manifest.json {key}: {got_manifest.get(key)!r} != fault-free "
                f"{want_manifest.get(key)!r}"
            )
    return problems


def _per_run_rows(reference: Path, name: str) -> Counter[str]:
    return Counter(row["run_id"] for row in read_csv(reference / name))


def audit(
    store: ResultStore,
    study_id: str,
    reference: Path,
    out_dir: Path,
    *,
    failed_expected: int = 0,
) -> Audit:
    """Audit the finished sweep ``study_id`` in ``store`` against the ``reference`` artifacts;
    exports to ``out_dir``. Raises ``AssertionError`` listing every problem."""
    reference_runs = read_csv(reference / "runs.csv")
    planned = len(reference_runs)
    report = Audit(study_id, planned)
    problems = report.problems
    report.counts = store.count_by_status(study_id)
    with store.engine.connect() as connection:

        def rows(sql: str) -> list[Any]:
            return list(connection.execute(text(sql), {"s": study_id}).all())

        # -- no lost run ---------------------------------------------------------------------
        indices = [row.plan_index for row in rows(
            "SELECT plan_index FROM runs WHERE study_id = :s ORDER BY plan_index"
        )]  # fmt: skip
        if indices != list(range(planned)):
            missing = sorted(set(range(planned)) - set(indices))
            problems.append(f"lost runs: plan indices {missing[:20]} have no row in runs")
        counted = {row.status: row.n for row in rows(
            "SELECT status, count(*) AS n FROM runs WHERE study_id = :s GROUP BY status"
        )}  # fmt: skip
        if {k: v for k, v in report.counts.items() if v} != counted:
            problems.append(f"study_counts {report.counts} disagree with the runs {counted}")
        success = report.counts.get("success", 0)
        failed = report.counts.get("failed", 0)
        if success != planned - failed_expected or failed != failed_expected:
            problems.append(
                f"lost runs: {success} success and {failed} failed of {planned} planned "
                f"(expected {planned - failed_expected} and {failed_expected}); counts "
                f"{report.counts}"
            )
        if failed and not failed_expected:
            for row in rows(
                "SELECT plan_index, error_kind, error_type, error_message FROM runs "
                "WHERE study_id = :s AND status = 'failed' ORDER BY plan_index LIMIT 5"
            ):
                problems.append(
                    f"run {row.plan_index} failed: {row.error_kind} {row.error_type}: "
                    f"{row.error_message}"
                )

        # -- no duplicate result -------------------------------------------------------------
        for row in rows(
            "SELECT plan_index, count(*) AS n FROM runs WHERE study_id = :s "
            "GROUP BY plan_index HAVING count(*) > 1"
        ):
            problems.append(f"duplicate runs rows: plan index {row.plan_index} x{row.n}")
        for row in rows(
            "SELECT plan_index, count(*) AS n FROM run_attempts "
            "WHERE study_id = :s AND outcome = 'success' GROUP BY plan_index HAVING count(*) > 1"
        ):
            problems.append(f"duplicate result: run {row.plan_index} has {row.n} successes")
        for table, csv_name in (("evaluations", "evaluations.csv"), ("events", "events.csv")):
            want = _per_run_rows(reference, csv_name)
            per_run = rows(
                f"SELECT run_id, count(*) AS n FROM {table} WHERE study_id = :s "
                "GROUP BY plan_index, run_id"
            )
            got = Counter({row.run_id: row.n for row in per_run})
            wrong = sorted(run for run in {*want, *got} if want[run] != got[run])
            if wrong:
                problems.append(
                    f"duplicate or missing {table} rows for {len(wrong)} runs, e.g. "
                    + ", ".join(f"{run}: {got[run]} (fault-free {want[run]})" for run in wrong[:5])
                )
            stale = rows(
                f"SELECT t.plan_index, t.attempt, r.attempt AS final FROM {table} t "
                "JOIN runs r ON r.study_id = t.study_id AND r.plan_index = t.plan_index "
                "WHERE t.study_id = :s AND t.attempt <> r.attempt ORDER BY t.plan_index LIMIT 5"
            )
            if stale:
                problems.append(
                    f"{table} rows written by a stale attempt: "
                    + ", ".join(f"run {r.plan_index} attempt {r.attempt}/{r.final}" for r in stale)
                )

        # -- bounded retries -----------------------------------------------------------------
        for row in rows(
            "SELECT r.plan_index, r.attempt, r.attempts_used, r.max_attempts, "
            "count(a.attempt) AS tries, "
            "coalesce(sum(CASE WHEN a.outcome <> 'released' THEN 1 ELSE 0 END), 0) AS charged, "
            "max(a.attempt) AS newest, "
            "coalesce(sum(CASE WHEN a.outcome = 'running' THEN 1 ELSE 0 END), 0) AS open "
            "FROM runs r LEFT JOIN run_attempts a "
            "ON a.study_id = r.study_id AND a.plan_index = r.plan_index "
            "WHERE r.study_id = :s GROUP BY r.plan_index, r.attempt, r.attempts_used, "
            "r.max_attempts ORDER BY r.plan_index"
        ):
            report.attempts_per_run[row.plan_index] = row.tries
            if row.charged > row.max_attempts or row.attempts_used > row.max_attempts:
                problems.append(
                    f"run {row.plan_index}: {row.charged} charged attempts "
                    f"(attempts_used {row.attempts_used}) > max_attempts {row.max_attempts}"
                )
            if row.newest != row.attempt:
                problems.append(
                    f"run {row.plan_index}: attempt {row.attempt} but newest attempt row "
                    f"{row.newest}"
                )
            if row.open:
                problems.append(f"run {row.plan_index}: {row.open} attempts still 'running'")

    # -- same artifacts ----------------------------------------------------------------------
    export_artifacts(store, study_id, out_dir)
    problems.extend(compare_artifacts(out_dir, reference))
    if problems:
        raise AssertionError(
            f"audit of {study_id} found {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        )
    return report
