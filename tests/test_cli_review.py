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
