"""Hardened defaults, checked without services: JSON-only messages, ``rediss://`` brokers,
Flower's refusal to listen publicly without a password, where secrets are read from, URL
masking, the worker's import allow-list, and settings errors that must not quote secrets.

Checked elsewhere, with real processes, and not repeated here:

* a pickled message sent to a real worker is refused unread and the worker keeps working:
  tests/distributed/test_celery_workers.py::
  test_a_pickled_message_is_refused_and_the_worker_keeps_working;
* a reference off the allow-list is refused before anything is imported, and a run of it
  fails as a ``binding`` error: tests/workers/test_worker_bindings.py::
  test_a_reference_not_on_the_allow_list_is_refused_without_importing and
  tests/workers/test_worker_execution.py::test_a_refused_import_is_a_binding_failure;
* the canary secret of a whole distributed sweep: test_security_canary.py.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import textwrap
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kombu.exceptions import ContentDisallowed
from kombu.serialization import dumps, loads, prepare_accept_content
from security_services import MASK, find_canary, free_port, make_canary

from orchestrator.cli import EXIT_CONNECT, EXIT_USAGE, main
from orchestrator.contracts.errors import SettingsError
from orchestrator.contracts.results import ErrorKind, RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings, load_settings
from orchestrator.contracts.wire import CONTENT_TYPE
from orchestrator.store import ResultStore, mask_url
from orchestrator.store.records import StudyInfo
from workers.app import create_app
from workers.config import load_worker_settings
from workers.execution import execute_run
from workers.runtime import StudyContext

SECRET_ENV = (
    "STUDYQ_DATABASE_URL", "STUDYQ_DATABASE_URL_FILE", "STUDYQ_BROKER_URL",
    "STUDYQ_BROKER_URL_FILE", "STUDYQ_FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH",
    "STUDYQ_LEASE_S", "STUDYQ_HEARTBEAT_S",
)  # fmt: skip


@pytest.fixture(autouse=True)
def _no_studyq_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets exactly the variables it is about."""
    for name in SECRET_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def canary() -> str:
    return make_canary()


def _secret_file(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _leaked(text: str, password: str) -> bool:
    return bool(find_canary(text, password))


# --- the canary test's detector ----------------------------------------------------------


@pytest.mark.parametrize("before", ["", "x", "xy"])  # every base64 alignment
def test_the_canary_detector_sees_encoded_and_partial_forms(before: str, canary: str) -> None:
    url = f"redis://:{canary}@127.0.0.1:6379/0"
    body = base64.b64encode(json.dumps({"k": before + url}).encode()).decode()
    for text in (
        url,
        body,  # a Celery message body in Redis
        urllib.parse.quote(url, safe=""),
        canary.encode().hex(),
        f"redis://:***@{canary[-7:]}@127.0.0.1:6379/0",  # masked up to the wrong '@'
        f"{{'broker_url': 'redis://:{canary[:12]}...",  # cut short
        f"...{canary[-6:]}@127.0.0.1:6379/0'}}",  # cut off at the front
    ):
        assert find_canary(text, canary), text
    assert not find_canary("redis://:***@127.0.0.1:6379/0 run-6a65a0bce80f canary-a", canary)


# --- JSON only ---------------------------------------------------------------------------


def test_the_app_speaks_json_only() -> None:
    app = create_app(Settings(broker_url="redis://127.0.0.1:6379/0"))
    try:
        conf = app.conf
        assert conf.accept_content == ["json"]
        assert (conf.task_serializer, conf.result_serializer, conf.event_serializer) == (
            "json", "json", "json",
        )  # fmt: skip
        assert CONTENT_TYPE == "application/json"  # what the publisher declares
    finally:
        app.close()


@pytest.mark.parametrize("serializer", ["pickle", "yaml"])
def test_other_content_types_are_refused_before_decoding(serializer: str) -> None:
    """What the worker's consumer does with a message body: ``loads`` with the app's accept
    list. A pickle (or any non-JSON body) is refused before it is deserialized."""
    app = create_app(Settings(broker_url="redis://127.0.0.1:6379/0"))
    try:
        accept = prepare_accept_content(app.conf.accept_content)  # as the consumer does
        content_type, encoding, body = dumps({"spec": {}}, serializer=serializer)
        with pytest.raises(ContentDisallowed):
            loads(body, content_type, encoding, accept=accept)
        content_type, encoding, body = dumps({"spec": {}}, serializer="json")
        assert loads(body, content_type, encoding, accept=accept) == {"spec": {}}
    finally:
        app.close()


# --- rediss:// -----------------------------------------------------------------------------


def _ssl_options(url: str) -> dict[str, Any]:
    app = create_app(Settings(broker_url=url))
    try:
        connection = app.connection_for_write()
        try:
            assert connection.transport_cls == "rediss"
            return dict(connection.ssl or {})
        finally:
            connection.release()
    finally:
        app.close()


def test_rediss_takes_its_tls_options_from_the_url(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    options = _ssl_options(
        f"rediss://:pw@127.0.0.1:6380/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    )
    assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert options["ssl_ca_certs"] == str(ca)
    # An explicit opt-out is the user's call.
    assert _ssl_options("rediss://:pw@127.0.0.1:6380/0?ssl_cert_reqs=none") == {
        "ssl_cert_reqs": ssl.CERT_NONE
    }


def test_rediss_without_options_verifies_the_server_certificate() -> None:
    """``rediss://host`` means TLS; without ``ssl_cert_reqs`` kombu falls back to
    CERT_NONE (it logs "defaulting to insecure SSL behaviour"), so anyone between worker and
    broker could pose as Redis and collect the password. The hardened default is to verify."""
    options = _ssl_options("rediss://:pw@127.0.0.1:6380/0")
    assert options.get("ssl_cert_reqs") == ssl.CERT_REQUIRED, (
        f"a rediss:// URL without ssl_cert_reqs connects with {options}: TLS without "
        "certificate verification"
    )


def _study_file(tmp_path: Path) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            study_id: security-rediss
            title: rediss check
            agent_specs: [noop]
            problem_ids: [noop]
            """
        ),
        encoding="utf-8",
    )
    return str(path)


def test_submit_accepts_a_rediss_broker_and_masks_it(
    tmp_path: Path, canary: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a rediss:// URL (nothing listens on its port) with the canary as password
    db = f"sqlite:///{tmp_path / 'studyq.db'}"
    url = f"rediss://:{canary}@127.0.0.1:{free_port()}/0?ssl_cert_reqs=required"
    # When submitting to it
    code = main(["submit", _study_file(tmp_path), "--db", db, "--broker", url, "--no-progress"])
    # Then the scheme was accepted, the broker tried and reported unreachable, masked
    err = capsys.readouterr().err
    assert code == EXIT_CONNECT, err
    assert "must start with" not in err
    assert f"rediss://:{MASK}@127.0.0.1:" in err
    assert not _leaked(err, canary)


def test_wait_accepts_a_rediss_broker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = f"sqlite:///{tmp_path / 'studyq.db'}"
    ResultStore.open(db).close()
    rediss = "rediss://:pw@127.0.0.1:6380/0?ssl_cert_reqs=required"
    # The broker check passes; the study is then not found in the (empty) store.
    assert main(["wait", "nope", "--db", db, "--broker", rediss, "--no-progress"]) == EXIT_USAGE
    assert "no study 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["submit", "wait"])
def test_brokers_that_are_neither_redis_nor_rabbitmq_are_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = _study_file(tmp_path) if command == "submit" else "nope"
    db = f"sqlite:///{tmp_path / 'studyq.db'}"
    broker = "kafka://guest:hunter2@127.0.0.1:9092/"
    assert main([command, target, "--db", db, "--broker", broker]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'kafka://', which studyq does not support" in err and "amqp://" in err
    assert "hunter2" not in err


# --- Flower --------------------------------------------------------------------------------


@pytest.fixture
def fake_celery(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Replaces Celery's command line (which would start Flower) with a recorder."""
    started: list[list[str]] = []
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # studyq flower rewrites sys.argv

    def fake_main() -> None:
        started.append(list(sys.argv))

    monkeypatch.setattr("celery.bin.celery.main", fake_main)
    return started


@pytest.mark.parametrize("auth", [None, ""], ids=["unset", "empty"])
@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.10", ""])
def test_flower_refuses_a_public_address_without_basic_auth(
    auth: str | None,
    address: str,
    fake_celery: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if auth is not None:
        monkeypatch.setenv("STUDYQ_FLOWER_BASIC_AUTH", auth)
    code = main(["flower", "--broker", "redis://127.0.0.1:6379/0", "--address", address])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert fake_celery == [], "flower was started"
    assert "refusing to listen on a public address" in err


def test_flower_refuses_a_public_address_with_an_empty_password(
    fake_celery: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``user:`` is a login anyone can type: Flower compares the whole ``user:password``."""
    monkeypatch.setenv("STUDYQ_FLOWER_BASIC_AUTH", "lab:")
    code = main(["flower", "--broker", "redis://127.0.0.1:6379/0", "--address", "0.0.0.0"])
    assert (code, fake_celery) == (EXIT_USAGE, []), (
        f"studyq flower started on 0.0.0.0 with the password-less login 'lab:': {fake_celery}"
    )


def test_flower_with_a_password_may_listen_publicly(
    fake_celery: list[list[str]], monkeypatch: pytest.MonkeyPatch, canary: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("STUDYQ_FLOWER_BASIC_AUTH", "lab:s3cret-login")
    broker = f"redis://:{canary}@127.0.0.1:6379/0"
    assert main(["flower", "--broker", broker, "--address", "0.0.0.0", "--port", "5599"]) == 0
    (argv,) = fake_celery
    assert "--basic-auth=lab:s3cret-login" in argv
    assert "--address=0.0.0.0" in argv and "--port=5599" in argv
    out = capsys.readouterr().out
    assert f"redis://:{MASK}@127.0.0.1:6379/0" in out
    assert not _leaked(out, canary)


def test_flower_on_loopback_needs_no_password(fake_celery: list[list[str]]) -> None:
    assert main(["flower", "--broker", "redis://127.0.0.1:6379/0"]) == 0
    (argv,) = fake_celery
    assert "--address=127.0.0.1" in argv
    assert not any(arg.startswith("--basic-auth") for arg in argv)


# --- where secrets come from ---------------------------------------------------------------


def test_secret_files_win_over_plain_variables_and_flags_win_over_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STUDYQ_DATABASE_URL", "postgresql://env@127.0.0.1/env")
    monkeypatch.setenv("STUDYQ_BROKER_URL", "redis://:env@127.0.0.1:6379/0")
    monkeypatch.setenv(
        "STUDYQ_DATABASE_URL_FILE",
        _secret_file(tmp_path / "db", "postgresql://file:pw@127.0.0.1/file\n"),
    )
    monkeypatch.setenv(
        "STUDYQ_BROKER_URL_FILE", _secret_file(tmp_path / "broker", "  redis://:pw@h:6379/1 \n")
    )
    # The file wins, stripped of the newline and spaces a secret file usually has
    settings = load_settings()
    assert settings.database_url == "postgresql://file:pw@127.0.0.1/file"
    assert settings.broker_url == "redis://:pw@h:6379/1"
    # Workers read the same way
    assert load_worker_settings().database_url == settings.database_url
    # An explicit value (a --db / --broker flag) wins over the file
    flagged = load_settings(database_url="sqlite:///flag.db", broker_url=None)
    assert flagged.database_url == "sqlite:///flag.db"
    assert flagged.broker_url == "redis://:pw@h:6379/1"


def test_an_empty_secret_file_is_refused_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret file that is there but empty (a Secret whose key was never filled) must not
    quietly send a worker to another database: it is an error naming the variable."""
    monkeypatch.setenv("STUDYQ_DATABASE_URL", "postgresql://env@127.0.0.1/env")
    path = _secret_file(tmp_path / "db", "\n")
    monkeypatch.setenv("STUDYQ_DATABASE_URL_FILE", path)
    with pytest.raises(SettingsError, match=f"STUDYQ_DATABASE_URL_FILE={path}: the file is empty"):
        load_settings()


def test_a_settings_error_does_not_quote_the_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, canary: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A misconfigured knob (lease shorter than 4 heartbeats) with the URLs from secret
    files: the error must name the knob, not print the URLs it was built with."""
    monkeypatch.setenv(
        "STUDYQ_DATABASE_URL_FILE",
        _secret_file(tmp_path / "db", f"postgresql://studyq:{canary}@127.0.0.1:5432/studyq"),
    )
    monkeypatch.setenv(
        "STUDYQ_BROKER_URL_FILE", _secret_file(tmp_path / "b", f"redis://:{canary}@redis:6379/0")
    )
    monkeypatch.setenv("STUDYQ_LEASE_S", "10")
    monkeypatch.setenv("STUDYQ_HEARTBEAT_S", "10")
    try:
        code: int | str = main(["status"])
        shown = ""
    except Exception as error:  # today: pydantic's ValidationError, uncaught
        code, shown = "raised", str(error)
    captured = capsys.readouterr()
    shown += captured.out + captured.err
    assert code != 0 and "STUDYQ_LEASE_S" in shown, shown
    assert not _leaked(shown, canary), f"the settings error quotes the secret:\n{shown}"


# --- masking -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://bob:{pw}@db:5432/studyq", "postgresql://bob:***@db:5432/studyq"),
        ("postgresql+psycopg://bob:{pw}@db/studyq", "postgresql+psycopg://bob:***@db/studyq"),
        ("postgres://bob:{pw}@db/studyq", "postgres://bob:***@db/studyq"),
        ("redis://:{pw}@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://default:{pw}@redis:6379/0", "redis://default:***@redis:6379/0"),
        (
            "rediss://:{pw}@redis:6380/0?ssl_cert_reqs=required",
            "rediss://:***@redis:6380/0?ssl_cert_reqs=required",
        ),
        ("unix://:{pw}@/run/redis.sock", "unix://:***@/run/redis.sock"),
        ("postgresql://bob@db/studyq", "postgresql://bob@db/studyq"),  # user only
        ("redis://redis:6379/0", "redis://redis:6379/0"),  # no credentials
        ("postgresql://bob:{pw}@db:notaport/studyq", "postgresql://bob:***@db:notaport/studyq"),
    ],
    ids=[
        "postgresql", "postgresql+psycopg", "postgres", "redis-password-only", "redis-user",
        "rediss", "unix-socket", "user-only", "no-auth", "unparseable",
    ],
)  # fmt: skip
def test_mask_url(url: str, masked: str, canary: str) -> None:
    shown = mask_url(url.format(pw=canary))
    assert shown == masked
    assert not _leaked(shown, canary)


def test_mask_url_of_a_parsed_url(canary: str) -> None:
    from sqlalchemy.engine import make_url

    shown = mask_url(make_url(f"postgresql+psycopg://bob:{canary}@db/studyq"))
    assert shown == "postgresql+psycopg://bob:***@db/studyq"


@pytest.mark.parametrize(
    "url",
    [
        # kombu reads the password up to the last '@' ('Canary...@tail' works as a Redis
        # password); mask_url must not show the part after the first '@'.
        "redis://:{head}@{tail}@redis:6379/0",
        # libpq takes the password from the query string too (psycopg passes it on).
        "postgresql://bob@db:5432/studyq?password={pw}",
    ],
    ids=["at-sign-in-redis-password", "postgresql-password-in-query"],
)
def test_mask_url_hides_every_form_of_password(url: str, canary: str) -> None:
    head, tail = canary[: len(canary) // 2], canary[len(canary) // 2 :]
    shown = mask_url(url.format(pw=canary, head=head, tail=tail))
    assert canary not in shown and tail not in shown and head not in shown, shown


# --- the worker's import allow-list --------------------------------------------------------


def _registered(reference: str, allowed: list[str]) -> StudyInfo:
    """A study as the store hands it to a worker: its stored bindings name ``reference``;
    ``allowed`` is what it was registered with."""
    return StudyInfo(
        study_id="security-allow-list",
        definition={"bindings": {"agents": {"planner": reference}}},
        definition_hash="0" * 64,
        plan_fingerprint="0" * 64,
        run_count=1,
        condition_count=1,
        max_attempts=3,
        submitted_by="test@host",
        submitted_at=datetime.now(UTC),
        allowed_references=allowed,
    )


def _spec() -> RunSpec:
    return RunSpec(
        study_id="security-allow-list", run_id="run-000000000001", condition_id="cond-1",
        replicate=1, seed=1, agent_id="planner", problem_id="noop",
    )  # fmt: skip


def test_a_worker_imports_only_what_the_study_was_registered_with(
    marker_module: tuple[str, Path],
) -> None:
    # Given a stored study whose bindings name a module it was not registered with (the row
    # was edited after registration, or written by something other than `studyq submit`)
    name, marker = marker_module
    context = StudyContext.build(_registered(f"{name}:agent", allowed=[]), allowed_imports=[])
    # When a worker runs it
    result = execute_run(_spec(), context.resolver)
    # Then the run fails as a binding error that says why and how to fix it, and the module
    # was never imported
    assert (result.status, result.error_kind) == (RunStatus.FAILED, ErrorKind.BINDING)
    assert "not on the worker's allow-list" in (result.error_message or "")
    assert "STUDYQ_ALLOWED_IMPORTS" in (result.error_message or "")
    assert not marker.exists()
    assert name not in sys.modules


@pytest.mark.parametrize("source", ["registered", "worker"])
def test_a_listed_reference_is_imported(marker_module: tuple[str, Path], source: str) -> None:
    name, marker = marker_module
    reference = f"{name}:agent"
    registered = [reference] if source == "registered" else []
    worker_list = [name] if source == "worker" else []  # STUDYQ_ALLOWED_IMPORTS prefix
    context = StudyContext.build(_registered(reference, registered), worker_list)
    result = execute_run(_spec(), context.resolver)
    assert result.status is RunStatus.SUCCESS, result.traceback
    assert marker.exists()
