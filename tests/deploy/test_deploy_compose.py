"""docker-compose.yml, .env.example, the Dockerfile and .dockerignore, checked against their
contract by reading them (no Docker engine runs here).

The compose file is parsed with PyYAML and resolved with compose's interpolation rules
(deploy_files.interpolate) using the values of .env.example, as ``docker compose`` would.
"""

from __future__ import annotations

import base64
import fnmatch
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from configparser import ConfigParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from deploy_files import (
    COMPOSE_SECRET,
    REPO,
    MissingVariable,
    compact,
    defaults,
    dockerfile_instructions,
    parse_duration,
    parse_env_file,
    resolve,
    secret_leaks,
    strings,
    variables,
)
from deploy_pg import unavailable

from orchestrator.cli import main as studyq_main
from workers.config import WorkerSettings

COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
STUDYQ_SERVICES = ("migrate", "worker", "flower", "coordinator")
SECRETS = {
    "STUDYQ_REDIS_PASSWORD",
    "STUDYQ_POSTGRES_PASSWORD",
    "STUDYQ_COORDINATOR_DB_PASSWORD",
    "STUDYQ_WORKER_DB_PASSWORD",
    "STUDYQ_ANALYST_DB_PASSWORD",
    "STUDYQ_FLOWER_BASIC_AUTH",
}
SETTINGS_VARIABLES = {f"STUDYQ_{name.upper()}" for name in WorkerSettings.model_fields} | {
    "STUDYQ_DATABASE_URL_FILE",
    "STUDYQ_BROKER_URL_FILE",
}
"""Every STUDYQ_* variable a studyq process reads (a misspelt one is silently ignored)."""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)[0]


@pytest.fixture(scope="module")
def filled_env(env_example: dict[str, str]) -> dict[str, str]:
    """.env.example with its secrets filled in, as a user's .env would be."""
    return {
        **env_example,
        **{name: f"value-of-{name.lower()}" for name in SECRETS},
        "STUDYQ_FLOWER_BASIC_AUTH": "lab:value-of-flower",
    }


@pytest.fixture(scope="module")
def resolved(compose: dict[str, Any], filled_env: dict[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = resolve(compose, filled_env)
    return document


def _service(document: dict[str, Any], name: str) -> dict[str, Any]:
    service: dict[str, Any] = document["services"][name]
    return service


# -- the services and what they run -------------------------------------------------------


def test_the_stack_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "redis",
        "postgres",
        "db-roles",
        "migrate",
        "db-grants",
        "pgbouncer",
        "worker",
        "flower",
        "coordinator",
    }


def test_studyq_services_run_the_image_built_from_the_dockerfile(
    resolved: dict[str, Any],
) -> None:
    for name in STUDYQ_SERVICES:
        service = _service(resolved, name)
        assert service["image"] == "studyq:latest", name
        assert (REPO / service["build"]["context"] / "Dockerfile").is_file(), name


def test_each_service_runs_its_command(resolved: dict[str, Any]) -> None:
    assert _service(resolved, "migrate")["command"] == ["db", "upgrade"]
    worker = _service(resolved, "worker")["command"]
    assert worker[0] == "worker"
    assert worker[worker.index("--queues") + 1] == "studyq"
    coordinator = _service(resolved, "coordinator")
    command = coordinator["command"]
    assert command[:2] == ["run", "/study/study.yaml"]
    assert command[command.index("--broker") + 1].startswith("redis://:")
    assert any(volume.endswith(":/study:ro") for volume in coordinator["volumes"])
    assert coordinator["profiles"] == ["coordinator"], "started only on request"
    flower = _service(resolved, "flower")
    assert flower["entrypoint"] == ["celery"]
    assert flower["command"][:2] == ["--app=workers.app", "flower"]


def test_the_coordinator_s_default_study_is_valid(
    resolved: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    volume = next(v for v in _service(resolved, "coordinator")["volumes"] if ":/study" in v)
    study = REPO / volume.split(":")[0] / "study.yaml"
    assert studyq_main(["validate", str(study)]) == 0, capsys.readouterr().err


def test_roles_and_migrations_run_in_order_before_anything_uses_the_database(
    resolved: dict[str, Any],
) -> None:
    def after(name: str) -> dict[str, str]:
        return {
            dependency: spec["condition"]
            for dependency, spec in _service(resolved, name).get("depends_on", {}).items()
        }

    assert after("db-roles") == {"postgres": "service_healthy"}
    assert after("migrate") == {"db-roles": "service_completed_successfully"}
    assert after("db-grants") == {"migrate": "service_completed_successfully"}
    assert after("pgbouncer") == {"db-roles": "service_completed_successfully"}
    for name in ("worker", "coordinator"):
        assert after(name) == {
            "redis": "service_healthy",
            "pgbouncer": "service_healthy",
            "migrate": "service_completed_successfully",
            "db-grants": "service_completed_successfully",
        }, name
    for name in ("db-roles", "db-grants"):
        service = _service(resolved, name)
        assert service["entrypoint"] == ["/bin/sh", "/deploy/postgres/apply-roles.sh"]
        source = service["volumes"][0].split(":")[0]
        assert (REPO / source / "apply-roles.sh").is_file()
        assert (REPO / source / "roles.sql").is_file()


def test_each_role_connects_as_its_own_database_role(resolved: dict[str, Any]) -> None:
    def user(name: str) -> str:
        url = _service(resolved, name)["environment"]["STUDYQ_DATABASE_URL"]
        return str(re.match(r"postgresql://([^:]+):", url).group(1))  # type: ignore[union-attr]

    assert user("worker") == "studyq_worker"
    assert user("migrate") == "studyq_coordinator"
    assert user("coordinator") == "studyq_coordinator"


def test_workers_and_coordinator_go_through_pgbouncer_and_migrations_do_not(
    resolved: dict[str, Any],
) -> None:
    def url(name: str) -> Any:
        return urlsplit(_service(resolved, name)["environment"]["STUDYQ_DATABASE_URL"])

    ini = ConfigParser()
    ini.read(REPO / "deploy" / "pgbouncer" / "pgbouncer.ini")
    assert ini["pgbouncer"]["pool_mode"] == "transaction"
    port = int(ini["pgbouncer"]["listen_port"])
    for name in ("worker", "coordinator"):
        assert (url(name).hostname, url(name).port) == ("pgbouncer", port), name
        assert parse_qs(url(name).query) == {"prepare_threshold": ["none"]}, name
    assert (url("migrate").hostname, url("migrate").port) == ("postgres", 5432)
    assert ini["databases"]["studyq"].split()[0] == "host=postgres"
    pgbouncer = _service(resolved, "pgbouncer")
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in pgbouncer["volumes"]}
    assert (
        REPO / mounts["/etc/pgbouncer/pgbouncer.ini"]
    ) == REPO / "deploy/pgbouncer/pgbouncer.ini"
    auth_dir = ini["pgbouncer"]["auth_file"].rsplit("/", 1)[0]
    assert any(entry.startswith(f"{auth_dir}:") for entry in pgbouncer["tmpfs"]), "on a tmpfs"
    assert pgbouncer["entrypoint"][-1] == ini["pgbouncer"]["auth_file"]
    assert "ports" not in pgbouncer, "reached only inside the compose network"


def test_studyq_processes_are_configured_only_with_settings_that_exist(
    compose: dict[str, Any],
) -> None:
    for name in STUDYQ_SERVICES:
        environment = _service(compose, name).get("environment", {})
        unknown = {key for key in environment if key.startswith("STUDYQ_")} - SETTINGS_VARIABLES
        assert not unknown, f"{name}: studyq reads no such setting: {unknown}"


# -- health -----------------------------------------------------------------------------------


def test_studyq_health_checks_call_studyq_check(compose: dict[str, Any]) -> None:
    for name in ("worker", "coordinator"):
        assert _service(compose, name)["healthcheck"]["test"] == ["CMD", "studyq", "check"]
    redis_test = " ".join(_service(compose, "redis")["healthcheck"]["test"])
    assert "redis-cli ping" in redis_test
    assert "pg_isready" in _service(compose, "postgres")["healthcheck"]["test"]
    flower_test = " ".join(_service(compose, "flower")["healthcheck"]["test"])
    assert "http://127.0.0.1:5555/healthcheck" in flower_test


def test_every_long_running_service_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if service.get("restart") == "unless-stopped":
            assert "healthcheck" in service, name


# -- Redis, Flower, ports ---------------------------------------------------------------------


def test_redis_requires_a_password_and_never_evicts_queued_runs(compose: dict[str, Any]) -> None:
    command = _service(compose, "redis")["command"]
    password = command[command.index("--requirepass") + 1]
    assert COMPOSE_SECRET.fullmatch(password) and "STUDYQ_REDIS_PASSWORD" in password
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_flower_requires_basic_auth_and_keeps_its_state(
    compose: dict[str, Any], resolved: dict[str, Any]
) -> None:
    flower = _service(compose, "flower")
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    assert COMPOSE_SECRET.fullmatch(auth) and ":?" in auth, "no Flower without a password"
    command = flower["command"]
    assert "--persistent=True" in command and "--db=/data/flower.db" in command
    volume = _service(resolved, "flower")["volumes"][0]
    assert volume == "flower-data:/data" and "flower-data" in compose["volumes"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


@pytest.mark.integration
@pytest.mark.slow
def test_flower_as_configured_demands_its_password_and_saves_its_state(
    resolved: dict[str, Any], tmp_path: Path
) -> None:
    """The compose file's Flower command line, run here (on 127.0.0.1, a free port and a
    temporary state file): the health check answers, pages need the password, and the state
    file is written."""
    redis_port = os.environ.get("STUDYQ_TEST_REDIS_PORT", "6379")
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", int(redis_port))) != 0:
            unavailable(f"Redis at 127.0.0.1:{redis_port} is not reachable")
    flower = _service(resolved, "flower")
    port = _free_port()
    state = tmp_path / "flower.db"
    replacements = {
        "--address=0.0.0.0": "--address=127.0.0.1",
        "--port=5555": f"--port={port}",
        "--db=/data/flower.db": f"--db={state}",
    }
    command = [replacements.get(arg, arg) for arg in flower["command"]]
    assert len(set(command) - set(flower["command"])) == 3
    auth = flower["environment"]["FLOWER_BASIC_AUTH"]
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "STUDYQ_BROKER_URL": f"redis://127.0.0.1:{redis_port}/15",
        "FLOWER_BASIC_AUTH": auth,
    }
    celery = str(Path(sys.executable).with_name(flower["entrypoint"][0]))
    log = (tmp_path / "flower.log").open("wb")
    process = subprocess.Popen([celery, *command], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert process.poll() is None, (tmp_path / "flower.log").read_text()
            time.sleep(0.2)
        assert _get(f"{base}/healthcheck") == 200
        assert _get(f"{base}/") == 401
        assert _get(f"{base}/", "lab:wrong") == 401
        assert _get(f"{base}/", auth) == 200
    finally:
        process.terminate()
        process.wait(20)
        log.close()
    assert list(tmp_path.glob("flower.db*")), "persistent mode writes its state on shutdown"


def _published(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    ports = []
    for entry in service.get("ports", []):
        parts = str(entry).split(":")
        assert len(parts) == 3, f"publish as HOST_IP:HOST_PORT:PORT, not {entry!r}"
        ports.append((parts[0], parts[1], parts[2]))
    return ports


def test_published_ports_listen_only_on_this_machine_by_default(
    resolved: dict[str, Any], compose: dict[str, Any], filled_env: dict[str, str]
) -> None:
    only_secrets = {name: filled_env[name] for name in SECRETS}
    for settings in (resolved, resolve(compose, only_secrets)):
        for name, service in settings["services"].items():
            for host_ip, _, _ in _published(service):
                assert host_ip == "127.0.0.1", name


def test_workers_scale(compose: dict[str, Any]) -> None:
    """`docker compose up --scale worker=8`: nothing may be unique to one container."""
    worker = _service(compose, "worker")
    for key in ("container_name", "ports", "hostname"):
        assert key not in worker, key
    for service in compose["services"].values():
        assert "container_name" not in service


def test_stopping_a_worker_leaves_time_for_its_runs(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    """Docker waits stop_grace_period after SIGTERM before SIGKILL: the worker's shutdown
    grace (how long runs may finish) plus a minute to hand the rest back and exit."""
    worker = _service(compose, "worker")
    assert worker["stop_signal"] == "SIGTERM"
    assert worker["init"] is True, "tini forwards SIGTERM to the worker's main process"
    for env in ({}, env_example):
        stop = parse_duration(resolve(worker["stop_grace_period"], env))
        grace = float(resolve(worker["environment"]["STUDYQ_SHUTDOWN_GRACE_S"], env))
        assert stop >= grace + 60, env


# -- secrets ----------------------------------------------------------------------------------


def _compose_reference(value: str) -> bool:
    return COMPOSE_SECRET.fullmatch(value) is not None


def test_no_secret_is_written_in_the_compose_file(compose: dict[str, Any]) -> None:
    assert secret_leaks(compact(compose), _compose_reference) == []


def test_every_secret_is_required(compose: dict[str, Any]) -> None:
    """A secret is never defaulted: compose refuses to start until it is set."""
    text = COMPOSE.read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses, name
        assert all(use.startswith(":?") for use in uses), name


def test_compose_refuses_to_start_without_the_secrets(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    with pytest.raises(MissingVariable, match="STUDYQ_"):
        resolve(compose, env_example)


def test_the_leak_scanner_finds_a_planted_password(compose: dict[str, Any]) -> None:
    planted = yaml.safe_load(COMPOSE.read_text())
    worker = planted["services"]["worker"]
    worker["environment"]["STUDYQ_DATABASE_URL"] = "postgresql://studyq_worker:hunter2@db/x"
    worker["environment"]["FLOWER_BASIC_AUTH"] = "admin:hunter2"
    planted["services"]["redis"]["command"][2] = "hunter2"
    leaks = secret_leaks(compact(planted), _compose_reference)
    assert len(leaks) == 3, leaks


# -- .env.example -----------------------------------------------------------------------------


def test_env_example_lists_every_variable_with_a_comment(compose: dict[str, Any]) -> None:
    values, comments = parse_env_file(ENV_EXAMPLE)
    used = set().union(*(variables(text) for _, text in strings(compose)))
    assert used == set(values)
    for name in values:
        assert comments[name], f"{name} has no comment above it"


def test_env_example_leaves_secrets_empty_and_matches_the_compose_defaults(
    env_example: dict[str, str],
) -> None:
    for name in SECRETS:
        assert env_example[name] == "", f"{name} must be empty in .env.example"
    for name, default in defaults(COMPOSE.read_text()).items():
        assert env_example[name] == default, f"{name}: {env_example[name]!r} != {default!r}"


# -- the Dockerfile ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE)


def test_the_image_is_python_3_11_slim_with_the_postgres_and_flower_extras(
    instructions: list[tuple[str, str]],
) -> None:
    bases = [arguments.split()[0] for keyword, arguments in instructions if keyword == "FROM"]
    assert bases and all(base == "python:3.11-slim" for base in bases)
    runs = " ".join(arguments for keyword, arguments in instructions if keyword == "RUN")
    assert re.search(r"pip (wheel|install)[^&]*\.\[postgres,flower\]", runs)
    assert (
        'pip install --no-cache-dir --no-index --find-links=/tmp/wheels "studyq[postgres,flower]"'
        in runs
    )


def test_the_image_runs_studyq_as_a_non_root_user(instructions: list[tuple[str, str]]) -> None:
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [(i, arguments) for i, (keyword, arguments) in enumerate(final) if keyword == "USER"]
    assert users, "the final stage must switch to a user"
    index, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert all(keyword != "RUN" for keyword, _ in final[index:]), "nothing runs as root after"
    assert ("ENTRYPOINT", '["studyq"]') in final
    healthcheck = next(arguments for keyword, arguments in final if keyword == "HEALTHCHECK")
    assert healthcheck.endswith('CMD ["studyq", "check"]')
    runs = " ".join(arguments for keyword, arguments in final if keyword == "RUN")
    assert "chown studyq:studyq /data" in runs, "Flower's state volume must be writable"


def test_the_dockerfile_copies_only_files_that_exist_and_holds_no_secret(
    instructions: list[tuple[str, str]],
) -> None:
    for keyword, arguments in instructions:
        if keyword == "COPY" and not arguments.startswith("--from"):
            *sources, _ = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), source
        if keyword in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|_URL)", arguments.upper()), arguments


def test_dockerignore_keeps_secrets_out_and_the_sources_in(
    instructions: list[tuple[str, str]],
) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                verdict = not negated
        return verdict

    for path in (".env", ".env.local", ".git", ".venv", "secrets/db_password", "studyq.db"):
        assert ignored(path), path
    copied = [
        source
        for keyword, arguments in instructions
        if keyword == "COPY" and not arguments.startswith("--from")
        for source in arguments.split()[:-1]
    ]
    for source in copied:
        assert not ignored(source), source


@pytest.mark.slow
def test_the_files_the_dockerfile_copies_build_a_complete_wheel(
    instructions: list[tuple[str, str]], tmp_path: Path
) -> None:
    """The build stage's context, rebuilt from its COPY lines, makes a wheel with the CLI,
    the migrations and the demo agents (what `pip wheel .` does in the image)."""
    context = tmp_path / "context"
    context.mkdir()
    for keyword, arguments in instructions:
        if keyword == "COPY" and not arguments.startswith("--from"):
            *sources, _ = arguments.split()
            for source in sources:
                if (REPO / source).is_dir():
                    shutil.copytree(
                        REPO / source,
                        context / source,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    )
                else:
                    shutil.copy2(REPO / source, context / source)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(context),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "wheels").glob("studyq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "orchestrator/cli/__main__.py",
        "orchestrator/store/migrations/env.py",
        "orchestrator/store/migrations/script.py.mako",
        "orchestrator/store/migrations/versions/v0001_initial.py",
        "workers/app.py",
        "workers/demo/agents.py",
    ):
        assert required in names, required
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "studyq = orchestrator.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
