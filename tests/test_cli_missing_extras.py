"""A missing optional package is one line naming the extra, exit 2 (issue 15).

Given the quickstart's install (``pip install -e .``: no ``psycopg``, no ``flower``), when the
cluster section's commands run (``main(argv)`` in-process, with the package's import made to
fail), then each prints one line that names what is missing and ``pip install
'studyq[postgres]'`` / ``'studyq[flower]'``, exits 2, and writes nothing: no store file, no
Flower URL, no Flower started.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cli_support import _no_studyq_environment, one_clear_line, run_main  # noqa: F401

from orchestrator.cli import EXIT_OK, EXIT_USAGE
from orchestrator.store import head_revision

_PASSWORD = "s3cret-pw"
_PG_URL = f"postgresql://studyq:{_PASSWORD}@127.0.0.1:1/studyq"


@pytest.fixture
def no_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import psycopg`` fails as it does where the ``postgres`` extra is not installed."""
    monkeypatch.setitem(sys.modules, "psycopg", None)


@pytest.fixture
def no_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``flower`` package is not importable, and starting it would fail the test."""
    monkeypatch.setitem(sys.modules, "flower", None)

    def _started(argv: list[str]) -> int:
        raise AssertionError(f"flower was started: {argv}")

    monkeypatch.setattr("orchestrator.executors.celery.run_flower", _started)


@pytest.mark.usefixtures("no_psycopg")
@pytest.mark.parametrize(
    "argv",
    [
        ["db", "upgrade", "--db", _PG_URL],
        ["db", "current", "--db", _PG_URL],
        ["db", "upgrade", "--db", _PG_URL.replace("postgresql://", "postgres://")],
    ],
    ids=["db-upgrade", "db-current", "postgres-scheme"],
)
def test_postgres_url_without_psycopg_names_the_extra(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(argv, capsys)
    assert code == EXIT_USAGE
    line = one_clear_line(err, "psycopg", "not installed", "pip install 'studyq[postgres]'")
    assert _PASSWORD not in line
    assert "studyq:***@127.0.0.1" in line
    assert out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_psycopg")
def test_postgres_url_from_environment_without_psycopg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STUDYQ_DATABASE_URL", _PG_URL)
    code, out, err = run_main(["db", "upgrade"], capsys)
    assert code == EXIT_USAGE
    one_clear_line(err, "pip install 'studyq[postgres]'")
    assert _PASSWORD not in err
    assert out == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_psycopg")
def test_sqlite_needs_no_postgres_driver(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The embedded path stays driver-free: the check is PostgreSQL's only."""
    code, out, err = run_main(["db", "upgrade", "--db", "sqlite:///./local.db"], capsys)
    assert code == EXIT_OK, err
    assert head_revision() in out
    assert (tmp_path / "local.db").exists()


@pytest.mark.usefixtures("no_flower")
@pytest.mark.parametrize(
    "argv",
    [
        ["flower", "--broker", "redis://127.0.0.1:1/0"],
        ["flower"],  # no broker either: the missing package is the first thing to fix
        ["flower", "--broker", "redis://127.0.0.1:1/0", "--address", "0.0.0.0"],
    ],
    ids=["broker", "no-broker", "public-address"],
)
def test_flower_without_the_package_names_the_extra(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(argv, capsys)
    assert code == EXIT_USAGE
    one_clear_line(err, "flower", "not installed", "pip install 'studyq[flower]'")
    assert out == ""  # no "flower on http://..." line before the failure
    assert list(tmp_path.iterdir()) == []
