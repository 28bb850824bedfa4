"""``studyq status`` prints each group of failed runs as a sentence ending in the fix for its
kind of error, never a record's repr."""

from __future__ import annotations

import re

import pytest

from orchestrator.cli.error_fixes import describe_error as _describe_error
from orchestrator.contracts.results import ErrorKind
from orchestrator.store.records import ErrorSummary

REPR = re.compile(r"\b[A-Z]\w+\((\w+=)")


def test_an_error_group_reads_as_a_sentence():
    # Given the top error groups of a study, as the store returns them
    groups = [
        ErrorSummary("timeout", "RunTimeoutError", 12, "run exceeded\n its limit of 5 s", "run-1"),
        ErrorSummary("binding", "BindingError", 1, "x" * 300),
        ErrorSummary(None, None, 2, None),
    ]
    # When status describes them
    lines = [_describe_error(group, "my-study") for group in groups]
    # Then each says how many runs failed, with which kind and class of error, and an example
    # on one line, clipped, then the fix
    assert lines[0].startswith(
        "12 runs failed with a timeout error (RunTimeoutError), e.g.: run exceeded its limit "
        "of 5 s. Fix: raise `execution.timeout_s`"
    )
    assert lines[1].startswith("1 run failed with a binding error (BindingError), e.g.: xxx")
    assert "xxx... Fix: " in lines[1] and len(lines[1].partition(" Fix: ")[0]) < 200
    assert lines[2].startswith("2 runs failed with an error. Fix: ")
    assert all("ErrorSummary" not in line and not REPR.search(line) for line in lines)
    assert all("\n" not in line and line.endswith(".") for line in lines)


@pytest.mark.parametrize(
    ("kind", "fix"),
    [
        (ErrorKind.ERROR, "`studyq show run-abc` prints one of them with its traceback"),
        (ErrorKind.TIMEOUT, "raise `execution.timeout_s`"),
        (ErrorKind.BINDING, "importable where the workers run (PYTHONPATH"),
        (ErrorKind.BINDING, "`studyq validate STUDY_FILE` checks it"),
        (ErrorKind.LOST, "check the worker logs and memory"),
        (ErrorKind.CANCELLED, "if you cancelled the study"),
    ],
)
def test_each_error_kind_gets_its_own_fix(kind: ErrorKind, fix: str) -> None:
    # Given a group of failed runs of one kind, with an example run
    group = ErrorSummary(kind.value, "SomeError", 3, "it broke", "run-abc")
    # When status describes it for a distributed study
    line = _describe_error(group, "my-study")
    # Then the sentence ends in the fix of that kind, names the example run for `studyq show`,
    # and says how to re-run exactly that kind
    sentence, _, tail = line.partition(" Fix: ")
    assert (
        sentence
        == f"3 runs failed with {'an' if kind is ErrorKind.ERROR else 'a'}"
        + ("" if kind is ErrorKind.ERROR else f" {kind.value}")
        + " error (SomeError), e.g.: it broke."
    )
    assert fix in tail
    assert "`studyq show run-abc`" in tail
    rerun = (
        "`studyq resubmit my-study`"
        if kind is ErrorKind.ERROR
        else (f"`studyq resubmit my-study --error {kind.value}`")
    )
    assert rerun in tail


def test_an_embedded_study_is_re_run_with_studyq_run() -> None:
    # Given a group of failed runs of an embedded (SQLite) study
    group = ErrorSummary("error", "KeyError", 1, "'x'", "run-abc")
    # When status describes it
    line = _describe_error(group, "my-study", embedded=True)
    # Then the fix re-runs it with `studyq run`, not with resubmit (which needs a broker)
    assert "`studyq run STUDY_FILE` re-runs the failed runs" in line
    assert "resubmit" not in line


def test_without_an_example_run_status_points_at_studyq_runs() -> None:
    # Given a group the store returned without an example run id
    group = ErrorSummary("error", "KeyError", 4, "'x'")
    # When status describes it
    line = _describe_error(group, "my-study")
    # Then it points at the listing of the failed runs and at `studyq show`
    assert "`studyq runs my-study --status failed` lists them" in line
    assert "`studyq show RUN_ID`" in line
