"""Bad settings get one clear line, never a traceback (issue 10).

Given a ``*_FILE`` secret that is missing, a directory, unreadable, not UTF-8 or empty, or a
float setting that is not a finite number, when the real ``studyq`` runs (``main(argv)``
in-process, or the installed script), then it prints one line that names the variable (and
the path) and the fix, exits 2, and creates no store.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import _no_studyq_environment, one_clear_line, run_main  # noqa: F401

from orchestrator.cli import EXIT_USAGE
from orchestrator.contracts.errors import SettingsError
from workers.config import WorkerSettings, load_worker_settings

# --- *_FILE secrets -------------------------------------------------------------------------


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "secrets" / "not-mounted-yet"


def _directory(tmp_path: Path) -> Path:
    (tmp_path / "secret-volume").mkdir()
    return tmp_path / "secret-volume"


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").write_text(" \n", encoding="utf-8")
    return tmp_path / "empty"


def _not_utf8(tmp_path: Path) -> Path:
    (tmp_path / "latin1").write_bytes(b"postgresql://caf\xe9@db/studyq\n")
    return tmp_path / "latin1"


def _unreadable(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root reads a mode-000 file; the permission case needs another user")
    path = tmp_path / "unreadable"
    path.write_text("postgresql://studyq@db/studyq\n", encoding="utf-8")
    path.chmod(0)
    return path


@pytest.mark.parametrize("variable", ["STUDYQ_DATABASE_URL", "STUDYQ_BROKER_URL"])
@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_missing, "no such file"),
        (_directory, "is a directory"),
        (_empty, "is empty"),
        (_not_utf8, "not UTF-8"),
        (_unreadable, "cannot read"),
    ],
    ids=["missing", "directory", "empty", "not-utf8", "unreadable"],
)
def test_a_secret_file_that_cannot_be_used_is_one_line_naming_it(
    variable: str,
    make: object,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given a *_FILE variable naming a file that cannot give a URL
    path = make(tmp_path)  # type: ignore[operator]
    store = tmp_path / "store.db"
    monkeypatch.setenv("STUDYQ_DATABASE_URL", f"sqlite:///{store}")
    monkeypatch.setenv(f"{variable}_FILE", str(path))
    # When a command reads its settings
    code, _, err = run_main(["status", "some-study"], capsys)
    # Then one line names the variable, the path and the fix; exit 2; no store was created
    assert code == EXIT_USAGE, err
    one_clear_line(err, f"{variable}_FILE={path}", says)
    assert not store.exists()


def test_a_missing_secret_file_is_no_traceback_end_to_end(tmp_path: Path) -> None:
    """The Kubernetes / Slurm case as a user sees it: the installed script, a Secret that is
    not mounted yet."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("STUDYQ_")}
    env["STUDYQ_DATABASE_URL_FILE"] = "/nonexistent/file"
    script = Path(sys.executable).parent / "studyq"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator.cli"]

    done = subprocess.run(
        [*command, "status", "x"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == EXIT_USAGE, done.stderr
    one_clear_line(done.stderr, "STUDYQ_DATABASE_URL_FILE=/nonexistent/file", "no such file")
    assert not list(tmp_path.iterdir()), "the command wrote into its working directory"


# --- non-finite float settings --------------------------------------------------------------

FLOAT_SETTINGS = sorted(
    name for name, field in WorkerSettings.model_fields.items() if field.annotation is float
)


def test_every_float_setting_is_checked() -> None:
    assert {"lease_s", "heartbeat_s", "shutdown_grace_s", "result_retry_s"} <= set(FLOAT_SETTINGS)


@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e999"])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_a_float_setting_refuses_non_finite_values(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    variable = f"STUDYQ_{name.upper()}"
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_worker_settings()
    message = str(raised.value)
    assert message.startswith(f"invalid setting {variable}: must be a finite number"), message
    assert "Fix:" in message and "\n" not in message


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_an_infinite_lease_is_one_line_and_exit_2(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STUDYQ_LEASE_S", value)
    code, _, err = run_main(["status"], capsys)
    assert code == EXIT_USAGE, err
    one_clear_line(err, "STUDYQ_LEASE_S", "finite")
    assert not Path("studyq.db").exists()


def test_finite_values_are_still_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDYQ_LEASE_S", "120")
    monkeypatch.setenv("STUDYQ_SHUTDOWN_GRACE_S", "0")
    settings = load_worker_settings()
    assert (settings.lease_s, settings.shutdown_grace_s) == (120.0, 0.0)
