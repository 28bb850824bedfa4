"""Regressions found by running the README and the docs as a new user would: bad input to
the newer commands is one line naming the thing and a fix, exit 2, and nothing starts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cli_support import one_clear_line, run_main

from orchestrator.cli import EXIT_OK, EXIT_USAGE

STUDY = """\
study_id: review-study
title: A study the review runs
factors:
  - name: size
    levels:
      - {name: small, value: 1}
      - {name: large, value: 2}
agent_specs: [noop]
problem_ids: [noop]
run_budget: {replicates: 1}
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_dashboard_with_an_unknown_study_is_refused_before_listening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a store holding one study
    study = tmp_path / "study.yaml"
    study.write_text(STUDY, encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    assert run_main(["run", str(study), "--db", url, "--jobs", "1"], capsys)[0] == EXIT_OK
    # When the dashboard is asked to open a study the store does not hold
    port = _free_port()
    code, out, err = run_main(
        ["dashboard", "no-such-study", "--db", url, "--port", str(port)], capsys
    )
    # Then it stops with one line naming the study, the studies there are and the fix, and
    # serves nothing (it returned instead of listening; the port is still free)
    assert code == EXIT_USAGE, err
    line = one_clear_line(err, "studyq dashboard", "no-such-study", "review-study")
    assert "http://" not in out + line
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


def test_dashboard_help_names_the_sqlite_default(capsys: pytest.CaptureFixture[str]) -> None:
    # Given the dashboard's --help
    with pytest.raises(SystemExit):
        run_main(["dashboard", "--help"], capsys)
    out = capsys.readouterr().out
    # Then --db's default is the one the command uses without STUDYQ_DATABASE_URL
    assert "sqlite:///studyq.db" in " ".join(out.split())


def test_the_export_help_example_works_after_the_quickstart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the quickstart run as the README says, in a folder of its own
    quickstart = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "study.yaml"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STUDYQ_DATABASE_URL", raising=False)
    assert run_main(["run", str(quickstart), "--jobs", "1"], capsys)[0] == EXIT_OK
    # When the example that ends `studyq export --help` is copied and pasted
    with pytest.raises(SystemExit):
        run_main(["export", "--help"], capsys)
    help_text = capsys.readouterr().out
    example = help_text.split("example:")[1].split()
    assert example[:2] == ["studyq", "export"]
    code, out, err = run_main(example[1:], capsys)
    # Then it exports the quickstart's study (its id is the one the example names)
    assert code == EXIT_OK, err
    assert (tmp_path / "artifacts" / "quickstart" / "runs.csv").is_file(), out


FAILING_STUDY = """\
study_id: failing-study
title: A study whose agent fails
factors:
  - name: size
    levels:
      - {name: small, value: 1}
agent_specs: [failing]
problem_ids: [noop]
run_budget: {replicates: 2}
bindings:
  agents: {failing: "reviewlab:failing"}
"""

FAILING_AGENT = """\
class Flaky(Exception):
    pass


def failing(seed):
    raise Flaky("the provider said no")
"""


def test_resubmit_error_class_that_matches_nothing_names_the_classes_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a study whose two runs failed with Flaky
    (tmp_path / "reviewlab.py").write_text(FAILING_AGENT, encoding="utf-8")
    study = tmp_path / "study.yaml"
    study.write_text(FAILING_STUDY, encoding="utf-8")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    run_main(["run", str(study), "--db", url, "--jobs", "1"], capsys)
    # When runs of a misspelt class are resubmitted (nothing matches: the broker is not used)
    broker = "redis://127.0.0.1:6379/9"
    argv = ["resubmit", "failing-study", "--error-class", "Flakey", "--db", url]
    code, out, err = run_main([*argv, "--broker", broker], capsys)
    # Then nothing is reset, and one note names the class asked for and the classes there are
    assert code == EXIT_OK, err
    assert "0 runs reset" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Flakey" in lines[0] and "Flaky (2)" in lines[0], err


def test_status_of_a_paused_study_shows_no_eta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an embedded study whose failure breaker paused it with runs left
    (tmp_path / "reviewlab.py").write_text(FAILING_AGENT, encoding="utf-8")
    study = tmp_path / "study.yaml"
    paused = FAILING_STUDY.replace("replicates: 2", "replicates: 40")
    study.write_text(paused + "execution:\n  breaker: {window: 2, max_failure_rate: 0.5}\n")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    run_main(["run", str(study), "--db", url, "--jobs", "1"], capsys)
    # When its status is read
    code, out, err = run_main(["status", "failing-study", "--db", url], capsys)
    # Then the study's row says paused where the ETA goes (nothing runs until it is resumed)
    assert code == EXIT_OK, err
    assert "paused: breaker" in out, out
    row = next(line for line in out.splitlines() if line.startswith("failing-study"))
    assert row.split()[-2] == "paused", out
