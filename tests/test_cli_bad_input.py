"""Bad references and URLs get one clear line, never a traceback (issue 10).

Given an unknown study id, a study file changed under the same ``study_id``, a broker URL of
the wrong scheme or a Redis password the server refuses, when the real ``studyq`` runs
(``main(argv)`` in-process), then it prints one line that names the study, the variable or
the option and the fix, exits 2, and writes nothing to the store or the queue. (Bad
settings: ``test_cli_bad_settings.py``.)

The Redis tests start their own ``redis-server --requirepass`` on a free port (the machine's
Redis may have no password) and stop it by its pid.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from cli_support import _no_studyq_environment, one_clear_line, run_main  # noqa: F401

from orchestrator.cli import EXIT_CONNECT, EXIT_OK, EXIT_USAGE, main
from orchestrator.store import ResultStore

HOST = "127.0.0.1"

STUDY = """\
study_id: bad-input-demo
title: Bad input demo
factors:
  - name: temperature
    levels:
      - {name: low, value: 0.2}
      - {name: high, value: 0.8}
agent_specs: [noop]
problem_ids: [noop]
"""
RUNS = 2


def _study_file(folder: Path, text: str = STUDY) -> Path:
    path = folder / "study.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- export and run: unknown study, changed study ----------------------------------------


@pytest.fixture
def ran_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """A study run to completion in a SQLite store (in this process, one job)."""
    db = f"sqlite:///{tmp_path / 'store.db'}"
    study = _study_file(tmp_path)
    code, _, err = run_main(
        ["run", str(study), "--db", db, "--jobs", "1", "--no-export", "--no-progress"], capsys
    )
    assert code == EXIT_OK, err
    return study, db


def test_export_of_an_unknown_study_names_the_store_and_its_studies(
    ran_study: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, db = ran_study
    code, out, err = run_main(["export", "NO-SUCH-STUDY", "--db", db], capsys)
    assert code == EXIT_USAGE, err
    one_clear_line(err, f"no study 'NO-SUCH-STUDY' in {db}", "studies: bad-input-demo")
    assert not Path("artifacts").exists() and not out


@pytest.mark.parametrize(
    "command",
    [
        ["export", "x"],
        ["status"],
        ["status", "x"],
        ["wait", "x", "--broker", "redis://127.0.0.1:6379/13", "--no-progress"],
        ["resubmit", "x", "--broker", "redis://127.0.0.1:6379/13"],
        ["cancel", "x"],
        ["delete", "x", "--yes"],
        ["runs", "x"],
        ["show", "run-0123456789ab"],
    ],
    ids=lambda argv: "-".join(argv[:2]),
)
def test_a_store_that_does_not_exist_is_named_and_not_created(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a --db naming a SQLite file that does not exist (a typo, another folder)
    db = f"sqlite:///{tmp_path / 'nowhere.db'}"
    # When a command that reads or changes an existing study uses it
    code, _, err = run_main([*command, "--db", db], capsys)
    # Then one line names the file and the fix, exit 2, and no empty store is left behind
    assert code == EXIT_USAGE, err
    one_clear_line(err, "nowhere.db", "does not exist")
    assert not (tmp_path / "nowhere.db").exists()


def _changed(study: Path) -> None:
    study.write_text(STUDY.replace("value: 0.8", "value: 0.9"), encoding="utf-8")


def _counts(db: str) -> dict[str, int]:
    with ResultStore.open(db) as store:
        return {k: v for k, v in store.count_by_status("bad-input-demo").items() if v}


def test_running_a_changed_study_under_the_same_id_exits_2(
    ran_study: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    study, db = ran_study
    _changed(study)
    code, _, err = run_main(["run", str(study), "--db", db, "--jobs", "1"], capsys)
    assert code == EXIT_USAGE, err
    assert "Traceback" not in err and "bad-input-demo" in err, err
    assert _counts(db) == {"success": RUNS}  # nothing registered, reset or run


# --- the broker: scheme and password -------------------------------------------------------


@pytest.fixture
def upgraded_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    db = f"sqlite:///{tmp_path / 'check.db'}"
    assert run_main(["db", "upgrade", "--db", db], capsys)[0] == EXIT_OK
    return db


@pytest.mark.parametrize(
    "broker", ["http://127.0.0.1:8080/", "kafka://guest:hunter2@127.0.0.1:9092/", "127.0.0.1:6379"]
)
def test_check_names_the_broker_schemes_it_supports(
    broker: str, upgraded_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["check", "--db", upgraded_db, "--broker", broker], capsys)
    assert code == EXIT_USAGE, out + err
    line = one_clear_line(err, "not support", "redis://", "amqp://", "--broker")
    assert "KeyError" not in line and "UNREACHABLE" not in line
    assert "hunter2" not in out + err


def test_check_of_a_missing_sqlite_file_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'nowhere.db'}"
    code, out, err = run_main(["check", "--db", db, "--no-broker"], capsys)
    assert code == EXIT_USAGE, out + err
    one_clear_line(err, f"database {db}: no such file", "studyq db upgrade")
    assert not list(tmp_path.glob("nowhere.db*"))


def test_check_of_a_database_url_it_cannot_parse_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_main(["check", "--db", "not-a-url", "--no-broker"], capsys)
    assert code == EXIT_USAGE, out + err
    line = err.strip()
    assert "\n" not in line and "Cannot parse database URL" in line and "UNREACHABLE" not in line


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


PASSWORD = "right-horse-battery"


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A private ``redis-server --requirepass`` on a free port; its port."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (CI is set)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--requirepass", PASSWORD,
         "--save", "", "--appendonly", "no", "--dir", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(host=HOST, port=port, password=PASSWORD, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.RedisError:
                assert process.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        yield port
    finally:
        process.kill()
        process.wait(10)


def test_check_passes_with_the_right_password(
    password_redis: int, upgraded_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = f"redis://:{PASSWORD}@{HOST}:{password_redis}/0"
    code, out, err = run_main(["check", "--db", upgraded_db, "--broker", broker], capsys)
    assert code == EXIT_OK, out + err
    assert f"broker redis://:***@{HOST}:{password_redis}/0: ok" in out


@pytest.mark.parametrize("auth", [":wrong-password-xyz@", ""], ids=["wrong", "none"])
def test_check_says_the_broker_refused_the_password(
    auth: str, password_redis: int, upgraded_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = f"redis://{auth}{HOST}:{password_redis}/0"
    code, out, err = run_main(["check", "--db", upgraded_db, "--broker", broker], capsys)
    assert code == EXIT_USAGE, out + err
    line = one_clear_line(err, "authentication failed", "password", "STUDYQ_BROKER_URL")
    assert "unreachable" not in line.lower() and "start Redis" not in line
    assert "wrong-password-xyz" not in out + err


def test_submit_with_a_refused_password_registers_nothing(
    password_redis: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "submit.db"
    broker = f"redis://:wrong-password-xyz@{HOST}:{password_redis}/0"
    study = _study_file(tmp_path)
    code, out, err = run_main(
        ["submit", str(study), "--db", f"sqlite:///{store}", "--broker", broker, "--no-progress"],
        capsys,
    )
    assert code == EXIT_USAGE, out + err
    one_clear_line(err, "authentication failed", "STUDYQ_BROKER_URL", "nothing was registered")
    assert "wrong-password-xyz" not in out + err
    assert not store.exists()
    client = redis.Redis(host=HOST, port=password_redis, password=PASSWORD)
    try:
        assert client.dbsize() == 0
    finally:
        client.close()


def test_submitting_a_changed_study_under_the_same_id_exits_2(
    password_redis: int, ran_study: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    study, db = ran_study
    _changed(study)
    broker = f"redis://:{PASSWORD}@{HOST}:{password_redis}/0"
    code, _, err = run_main(
        ["submit", str(study), "--db", db, "--broker", broker, "--no-progress"], capsys
    )
    assert "bad-input-demo" in err and "Traceback" not in err, err
    assert _counts(db) == {"success": RUNS}
    assert code == EXIT_USAGE, err


@pytest.mark.parametrize("command", [["status", "x"], ["export", "x"], ["db", "upgrade"]])
@pytest.mark.parametrize("url", ["mysql://user@127.0.0.1/db", "not-a-url"])
def test_a_database_url_studyq_cannot_use_is_a_usage_error_everywhere(
    command: list[str], url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a --db URL of another backend, or one that does not parse
    # When a command that opens the store runs, then one line says so, exit 2
    assert main([*command, "--db", url]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "Unsupported database backend" in err or "Cannot parse database URL" in err


RABBITMQ = "127.0.0.1:5672"


@pytest.fixture
def rabbitmq_up() -> None:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        if os.environ.get("CI"):
            raise
        pytest.skip("RabbitMQ is not running on 127.0.0.1:5672")


def test_check_says_rabbitmq_refused_the_password(
    rabbitmq_up: None, upgraded_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = f"amqp://guest:wrong-password-xyz@{RABBITMQ}//"
    code, out, err = run_main(["check", "--db", upgraded_db, "--broker", broker], capsys)
    assert code == EXIT_USAGE, out + err
    line = one_clear_line(
        err, "authentication failed", "amqp://USER:PASSWORD@", "STUDYQ_BROKER_URL"
    )
    assert "unreachable" not in line.lower()
    assert "wrong-password-xyz" not in out + err


def test_submit_to_a_refusing_rabbitmq_registers_nothing(
    rabbitmq_up: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "submit.db"
    broker = f"amqp://guest:wrong-password-xyz@{RABBITMQ}//"
    code, out, err = run_main(
        ["submit", str(_study_file(tmp_path)), "--db", f"sqlite:///{store}", "--broker", broker],
        capsys,
    )
    assert code == EXIT_USAGE, out + err
    one_clear_line(err, "authentication failed", "nothing was registered")
    assert "wrong-password-xyz" not in out + err
    assert not store.exists()


def test_check_says_when_nothing_listens_for_amqp(
    upgraded_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = "amqp://guest:guest@127.0.0.1:1//"
    code, out, err = run_main(["check", "--db", upgraded_db, "--broker", broker], capsys)
    assert code == EXIT_CONNECT, out + err
    one_clear_line(err, "UNREACHABLE", "start RabbitMQ")
