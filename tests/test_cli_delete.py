"""``studyq delete STUDY --yes``: a mistaken study and its results leave the store; a study
with runs in flight, an unknown study or a missing ``--yes`` changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_support import run_main

from orchestrator.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from orchestrator.store import ResultStore

STUDY = """\
study_id: mistaken-study
title: A study run by mistake
factors:
  - name: size
    levels:
      - {name: small, value: 1}
      - {name: large, value: 2}
agent_specs: [noop]
problem_ids: [noop]
run_budget: {replicates: 2}
"""


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(STUDY, encoding="utf-8")
    return path


def _url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


def test_delete_without_yes_only_says_what_it_would_delete(
    study_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a study that ran
    url = _url(tmp_path)
    assert run_main(["run", str(study_file), "--db", url, "--jobs", "1"], capsys)[0] == EXIT_OK
    # When it is deleted without --yes
    code, _out, err = run_main(["delete", "mistaken-study", "--db", url], capsys)
    # Then nothing is deleted and the message says what --yes would delete
    assert code == EXIT_USAGE, err
    assert "would delete study 'mistaken-study'" in err and "4 success" in err
    assert "--yes" in err
    with ResultStore.open(url) as store:
        assert store.find_study("mistaken-study") is not None


def test_delete_yes_removes_the_study_and_its_results(
    study_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(tmp_path)
    assert run_main(["run", str(study_file), "--db", url, "--jobs", "1"], capsys)[0] == EXIT_OK

    code, out, err = run_main(["delete", "mistaken-study", "--yes", "--db", url], capsys)

    assert code == EXIT_OK, err
    assert out.strip() == "mistaken-study: deleted (4 success)"
    with ResultStore.open(url) as store:
        assert store.find_study("mistaken-study") is None
        assert list(store.iter_runs("mistaken-study")) == []
    # And the same run registers it afresh
    assert run_main(["run", str(study_file), "--db", url, "--jobs", "1"], capsys)[0] == EXIT_OK


def test_delete_refuses_a_study_with_runs_in_flight(
    study_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a study of which one run ran and the other three are still planned
    url = _url(tmp_path)
    ran = run_main(["run", str(study_file), "--db", url, "--jobs", "1", "--limit", "1"], capsys)
    assert ran[0] == EXIT_OK, ran
    # When it is deleted
    code, _out, err = run_main(["delete", "mistaken-study", "--yes", "--db", url], capsys)
    # Then it is refused, naming what is in flight and the fix, and nothing is deleted
    assert code == EXIT_FAILED
    assert "3 planned" in err and "studyq cancel mistaken-study" in err
    with ResultStore.open(url) as store:
        assert store.count_by_status("mistaken-study")["planned"] == 3
    # And once cancelled it can be deleted
    assert run_main(["cancel", "mistaken-study", "--db", url], capsys)[0] == EXIT_OK
    assert run_main(["delete", "mistaken-study", "--yes", "--db", url], capsys)[0] == EXIT_OK


def test_delete_of_an_unknown_study_names_the_known_ones(
    study_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _url(tmp_path)
    assert run_main(["run", str(study_file), "--db", url, "--jobs", "1"], capsys)[0] == EXIT_OK

    code, _out, err = run_main(["delete", "mistaken-stuyd", "--yes", "--db", url], capsys)

    assert code == EXIT_USAGE
    assert "studyq delete: no study 'mistaken-stuyd'" in err and "mistaken-study" in err
    assert "Fix:" in err


def test_delete_of_a_missing_store_file_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _out, err = run_main(["delete", "x", "--yes", "--db", _url(tmp_path)], capsys)

    assert code == EXIT_USAGE
    assert "does not exist" in err
    assert not (tmp_path / "store.db").exists()
