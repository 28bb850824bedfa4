"""Bad input gets a clear error and changes nothing.

Given a study file with exactly one defect (``tests/bad_studies/``, each case described in
``expected.yaml``), when ``studyq validate`` reads it, then it exits 2 and prints one problem
line ``<path>: <field path>: <message> Fix: <fix>`` naming the file, the field and the fix;
never a traceback, and nothing is written anywhere.

The corpus is run in a copy inside ``tmp_path`` (relative ``matrix_path`` values resolve
against the working directory, as upstream does), so any stray write is caught by comparing
the copy before and after. Huge inputs are generated here, never committed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

CORPUS = Path(__file__).parent / "bad_studies"
MANIFEST = CORPUS / "expected.yaml"
EXIT_INVALID = 2
EXIT_OK = 0
MIN_CASES = 45

# The study every corpus file is derived from; it must itself be valid, so each corpus
# file's only problem is its one defect.
BASE_STUDY = """\
study_id: bad-study
title: One-defect study
factors:
  - name: temperature
    levels:
      - name: low
        value: 0.2
      - name: high
        value: 0.8
problem_ids: [beam-design]
agent_specs: [noop]
"""

# Uses most sections a study may have, so a validator that rejects valid features fails here.
RICH_STUDY = """\
study_id: rich-study
title: Prompt framing and temperature
description: Every section studyq reads, all of it valid.
authors: [A. Student]
tags: [pilot]
factors:
  - name: prompt_style
    kind: manipulated
    levels:
      - {name: neutral, value: neutral, metadata: {is_baseline: true}}
      - {name: terse, value: terse}
  - name: temperature
    levels:
      - {name: low, value: 0.2}
      - {name: high, value: 0.8}
  - name: max_steps
    default: 4
blocks:
  - name: site
    levels: [lab-a, lab-b]
constraints:
  - constraint_id: c1
    description: terse prompts only at low temperature
    expression: "not (prompt_style == 'terse' and temperature > 0.5)"
    severity: warning
  - constraint_id: c2
    description: drop the hottest neutral run
    expression: "prompt_style != 'neutral' or temperature < 0.5 or site == 'lab-a'"
outcomes:
  - name: success_rate
    source_table: runs
    column: primary_outcome
    aggregation: mean
    primary: true
hypotheses:
  - hypothesis_id: H1
    label: Temperature effect
    statement: Higher temperature changes the success rate.
    kind: effect
    direction: different
    independent_vars: [temperature]
    dependent_vars: [success_rate]
analysis_plans:
  - analysis_plan_id: P1
    hypothesis_ids: [H1]
    tests: [t_test]
    outcomes: [success_rate]
design_spec:
  kind: full_factorial
  randomize: true
run_budget:
  replicates: 2
  max_runs: 100
  parallelism: 2
seed_policy:
  base_seed: 7
problem_ids: [beam-design, spring-design]
agent_specs: [noop]
execution:
  timeout_s: 30
"""

# One study, three independent defects in three sections; all must be reported at once.
THREE_DEFECTS = (
    BASE_STUDY
    + """\
outcomes:
  - name: success_rate
    source_table: runs
    column: primary_outcome
    aggregation: mean
hypotheses:
  - hypothesis_id: H1
    label: Temperature effect
    statement: Higher temperature changes the success rate.
    independent_vars: [temprature]
    dependent_vars: [success_rate]
design_spec:
  kind: taguchi
run_budget:
  replicates: 0
"""
)
THREE_DEFECT_FIELDS = (
    "hypotheses[0].independent_vars",
    "design_spec.kind",
    "run_budget.replicates",
)


@dataclass(frozen=True)
class Case:
    """One corpus file and what ``studyq validate`` must say about it."""

    file: str
    defect: str
    field: str
    message: tuple[str, ...]
    max_problems: int = 1


@dataclass(frozen=True)
class Outcome:
    """What one ``studyq validate`` call returned and printed."""

    rc: int | None
    out: str
    err: str

    def lines_about(self, name: str) -> list[str]:
        """The stderr lines that name the study file: one per problem."""
        return [line for line in self.err.splitlines() if name in line]

    def show(self) -> str:
        return f"exit code {self.rc}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"


def _load_cases() -> list[Case]:
    raw = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    cases = []
    for entry in raw["cases"]:
        message = entry["message"]
        cases.append(
            Case(
                file=entry["file"],
                defect=entry["defect"],
                field=entry["field"],
                message=tuple(message) if isinstance(message, list) else (message,),
                max_problems=entry.get("max_problems", 1),
            )
        )
    return cases


CASES = _load_cases()
SUBPROCESS_FILES = (
    "wrong_suffix.txt",
    "yaml_unclosed_quote.yaml",
    "replicates_string.yaml",
    "constraint_import_os.yaml",
    "yaml_alias_bomb.yaml",
)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


def _clean_env(store: Path) -> dict[str, str]:
    """No STUDYQ_* settings leak in; the store and broker point where a write would show."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("STUDYQ_")}
    env["STUDYQ_DATABASE_URL"] = f"sqlite:///{store}"
    env["STUDYQ_BROKER_URL"] = "redis://127.0.0.1:9/0"  # nothing listens; validate needs none
    return env


@pytest.fixture(scope="module")
def corpus_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("bad_studies")
    shutil.copytree(CORPUS, target, dirs_exist_ok=True)
    return target


@pytest.fixture
def workdir(corpus_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run inside the corpus copy with a clean environment; fail if anything was written."""
    store = tmp_path / "store.db"
    for key in [key for key in os.environ if key.startswith("STUDYQ_")]:
        monkeypatch.delenv(key)
    clean = _clean_env(store)
    monkeypatch.setenv("STUDYQ_DATABASE_URL", clean["STUDYQ_DATABASE_URL"])
    monkeypatch.setenv("STUDYQ_BROKER_URL", clean["STUDYQ_BROKER_URL"])
    monkeypatch.chdir(corpus_copy)
    before = _snapshot(corpus_copy)
    yield corpus_copy
    assert _snapshot(corpus_copy) == before, "validate wrote into the working directory"
    assert not store.exists(), "validate created the result store"


def _validate(path: Path, capfd: pytest.CaptureFixture[str]) -> Outcome:
    """``studyq validate PATH`` in-process; an escaping exception is itself a failure."""
    from orchestrator.cli import main

    capfd.readouterr()
    try:
        rc: Any = main(["validate", str(path)])
    except SystemExit as exc:
        rc = exc.code
    except Exception:
        out, err = capfd.readouterr()
        pytest.fail(
            f"validate raised instead of reporting (a user would see this traceback):\n"
            f"{traceback.format_exc()}\n{Outcome(None, out, err).show()}"
        )
    out, err = capfd.readouterr()
    return Outcome(rc, out, err)


def _says(line: str, parts: tuple[str, ...]) -> bool:
    """Every part appears (case-insensitively); ``a|b`` in a part accepts either wording."""
    text = line.lower()
    return all(any(word in text for word in part.lower().split("|")) for part in parts)


def _assert_rejected(outcome: Outcome, name: str, case: Case) -> None:
    shown = outcome.show()
    assert outcome.rc == EXIT_INVALID, f"{name}: expected exit code 2\n{shown}"
    assert "Traceback" not in outcome.out + outcome.err, f"{name}: traceback printed\n{shown}"
    lines = outcome.lines_about(name)
    assert lines, f"{name}: no problem line names the file\n{shown}"
    assert len(lines) <= case.max_problems, (
        f"{name}: {len(lines)} problem lines for a single defect "
        f"(allowed {case.max_problems})\n{shown}"
    )
    matching = [line for line in lines if case.field in line and _says(line, case.message)]
    assert matching, (
        f"{name} ({case.defect}): no problem line names field {case.field!r} and says "
        f"{list(case.message)!r}\n{shown}"
    )
    assert all(" Fix: " in line for line in matching), f"{name}: the problem gives no fix\n{shown}"


def test_manifest_covers_the_corpus() -> None:
    listed = [case.file for case in CASES]
    on_disk = {path.name for path in CORPUS.iterdir() if path.is_file() and path != MANIFEST}
    assert len(listed) == len(set(listed)), "a file is listed twice in expected.yaml"
    assert set(listed) == on_disk, "expected.yaml and the corpus files disagree"
    assert len(listed) >= MIN_CASES


@pytest.mark.parametrize("case", CASES, ids=[case.file for case in CASES])
@pytest.mark.timeout(20)
def test_bad_study_is_rejected_with_one_clear_problem(
    case: Case, workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    outcome = _validate(workdir / case.file, capfd)

    _assert_rejected(outcome, case.file, case)
    assert "uid=" not in outcome.out + outcome.err, "a constraint expression ran `id`"


@pytest.mark.parametrize("name", SUBPROCESS_FILES)
def test_bad_study_exits_2_without_traceback_end_to_end(name: str, corpus_copy: Path) -> None:
    store = corpus_copy.parent / f"store-{name}.db"
    before = _snapshot(corpus_copy)

    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "validate", str(corpus_copy / name)],
        cwd=corpus_copy,
        env=_clean_env(store),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    shown = f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.returncode == EXIT_INVALID, shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    assert name in result.stderr, shown
    assert "uid=" not in result.stdout, shown
    assert _snapshot(corpus_copy) == before
    assert not store.exists()


@pytest.mark.parametrize(
    ("name", "text"), [("base", BASE_STUDY), ("rich", RICH_STUDY)], ids=["base", "rich"]
)
def test_valid_study_passes(
    name: str, text: str, tmp_path: Path, workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")

    outcome = _validate(path, capfd)

    assert outcome.rc == EXIT_OK, outcome.show()
    assert outcome.out.strip(), f"no summary on stdout\n{outcome.show()}"
    assert "Traceback" not in outcome.out + outcome.err, outcome.show()


def test_every_problem_is_reported_at_once(
    tmp_path: Path, workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "three_defects.yaml"
    path.write_text(THREE_DEFECTS, encoding="utf-8")

    outcome = _validate(path, capfd)

    assert outcome.rc == EXIT_INVALID, outcome.show()
    assert "Traceback" not in outcome.err, outcome.show()
    lines = outcome.lines_about(path.name)
    for field in THREE_DEFECT_FIELDS:
        assert any(field in line for line in lines), f"{field} not reported\n{outcome.show()}"
    assert len(lines) == len(THREE_DEFECT_FIELDS), outcome.show()


@pytest.mark.timeout(20)
def test_huge_file_is_refused_before_parsing(
    tmp_path: Path, workdir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "huge.yaml"
    line = "  " + "x" * 1021 + "\n"  # 1 KiB per line of a block scalar
    with path.open("w", encoding="utf-8") as handle:
        handle.write(BASE_STUDY + "notes: |\n")
        handle.write(line * (50 * 1024))
    assert path.stat().st_size > 50 * 1024 * 1024

    started = time.perf_counter()
    outcome = _validate(path, capfd)
    elapsed = time.perf_counter() - started
    path.unlink()  # pytest keeps recent tmp dirs; do not leave 50 MB behind

    case = Case(path.name, "a 50 MB study", "(file)", ("limit", "STUDYQ_MAX_STUDY_BYTES"))
    _assert_rejected(outcome, path.name, case)
    assert elapsed < 2.0, f"took {elapsed:.1f} s: the file was read or parsed before refusing"


def test_size_limit_follows_the_setting(
    tmp_path: Path,
    workdir: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(BASE_STUDY, encoding="utf-8")
    monkeypatch.setenv("STUDYQ_MAX_STUDY_BYTES", "100")

    outcome = _validate(path, capfd)

    case = Case(path.name, "a study over a 100-byte limit", "(file)", ("limit",))
    _assert_rejected(outcome, path.name, case)
