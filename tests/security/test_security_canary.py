"""A canary secret must never show: a real sweep whose broker and database passwords are a
recognizable random string, and a search for that string everywhere studyq writes.

The scenario (run once for the module by the ``sweep`` fixture):

* a Redis of the test's own with the canary as its password (``requirepass``), and a
  throwaway PostgreSQL database owned by a login role with the canary as its password;
* the URLs given only through ``STUDYQ_DATABASE_URL_FILE`` / ``STUDYQ_BROKER_URL_FILE`` for
  one half (study A, a worker, Flower) and only through plain ``STUDYQ_DATABASE_URL`` /
  ``STUDYQ_BROKER_URL`` for the other (study B, a second worker);
* ``studyq db upgrade``, ``check``, ``submit``, ``worker`` (log at INFO), ``wait``,
  ``status``, ``status <id>``, ``export`` and ``flower`` (basic auth; its task, worker and
  queue APIs), and commands that fail on a URL: ``check`` on a port nothing listens on,
  ``status`` / ``db upgrade`` / a worker on a database that does not exist, ``submit`` with a
  wrong broker password that starts with the canary (printing it would print the canary).

The tests then look for the canary (plain, URL-quoted, hex, inside base64, and telling
pieces of it) in every captured output and log and the processes' command lines, the
exported artifacts, a ``pg_dump --data-only`` of the database, every key of the Redis (while
the run messages were queued, and at the end) and Flower's JSON; and for the masked form
(``***``) where URLs are printed, so a transcript with no URL in it cannot pass.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dist_services import HOST, WorkerProcess
from security_services import (
    MASK,
    CanaryDatabase,
    CanaryRedis,
    Captured,
    FlowerProcess,
    Transcript,
    command_lines,
    find_canary,
    free_port,
    make_canary,
    postgres_dump,
    read_tree,
    redis_dump,
    studyq,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]

QUEUE = "studyq"
"""The default queue: the Redis is the test's own, so nothing else reads it."""
STUDIES = ("canary-a", "canary-b", "canary-c")
"""A: submitted with secret files; B: with plain variables; C: never reaches the broker."""
RUNS_PER_STUDY = 4


@dataclass
class Sweep:
    """What the scenario ran and collected."""

    canary: str
    redis: CanaryRedis
    database: CanaryDatabase
    transcript: Transcript = field(default_factory=Transcript)
    commands: dict[str, Captured] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)
    postgres: str = ""
    redis_keys: list[str] = field(default_factory=list)
    flower: dict[str, str] = field(default_factory=dict)


def _study(path: Path, study_id: str) -> str:
    """2 agents x 1 problem x 2 replicates of the demo agents: 4 runs of a few ms."""
    path.write_text(
        textwrap.dedent(
            f"""\
            study_id: {study_id}
            title: canary sweep
            agent_specs: [random-search, hill-climb]
            problem_ids: [beam-design]
            factors:
              - name: budget
                kind: manipulated
                levels: [{{name: small, value: 20}}]
            design_spec: {{kind: full_factorial}}
            run_budget: {{replicates: 2}}
            execution: {{queue: {QUEUE}}}
            """
        ),
        encoding="utf-8",
    )
    return str(path)


def _secret_file(path: Path, value: str) -> str:
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)
    return str(path)


Command = tuple[str, list[str], dict[str, str]]
"""A name for the result, the ``studyq`` arguments, the environment."""


def _scenario(result: Sweep, root: Path) -> None:
    """Run the sweep and the failing commands; collect outputs, logs, artifacts and dumps."""
    database, redis_server, transcript = result.database, result.redis, result.transcript
    logs = root / "logs"
    logs.mkdir()
    # Half of the commands get the URLs from secret files only, half from plain variables.
    by_file = {
        "STUDYQ_DATABASE_URL_FILE": _secret_file(root / "db_url", database.url()),
        "STUDYQ_BROKER_URL_FILE": _secret_file(root / "broker_url", redis_server.url()),
    }
    by_env = {"STUDYQ_DATABASE_URL": database.url(), "STUDYQ_BROKER_URL": redis_server.url()}
    quick = {"STUDYQ_RECONCILE_INTERVAL_S": "0.5"}
    # The commands that must fail get URLs with the same password and a port nothing
    # listens on, a database that does not exist, or a wrong Redis password.
    dead_port = free_port()
    missing_db = database.url(database="no_such_db")
    dead_db_file = {
        **by_file,
        "STUDYQ_DATABASE_URL_FILE": _secret_file(root / "dead", database.url(port=dead_port)),
    }
    missing_db_file = {
        **by_file,
        "STUDYQ_DATABASE_URL_FILE": _secret_file(root / "missing", missing_db),
    }
    dead_broker_env = {**by_env, "STUDYQ_BROKER_URL": redis_server.url(port=dead_port)}
    missing_db_env = {**by_env, "STUDYQ_DATABASE_URL": missing_db}
    wrong_password_env = {
        **by_env,
        "STUDYQ_BROKER_URL": redis_server.url(password=f"{result.canary}-wrong"),
    }
    studies = {name: _study(root / f"{name}.yaml", name) for name in STUDIES}

    def run(*commands: Command) -> None:
        """Independent ``studyq`` commands, at the same time (each is a process)."""
        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            futures = {
                name: pool.submit(studyq, transcript, *args, env=env, cwd=root)
                for name, args, env in commands
            }
            result.commands.update({name: future.result() for name, future in futures.items()})

    run(("upgrade", ["db", "upgrade"], by_file))
    workers: list[WorkerProcess] = []
    flower = FlowerProcess(env=by_file, log_dir=logs, cwd=root)
    try:
        run(
            ("check-file", ["check"], by_file),
            ("submit-a", ["submit", studies["canary-a"], "--no-progress"], by_file),
            ("submit-b", ["submit", studies["canary-b"], "--no-progress"], by_env),
        )
        # No worker runs yet: the run messages wait in Redis. Look at them there.
        result.redis_keys.append(redis_dump(redis_server.client))
        only_files = {"STUDYQ_DATABASE_URL": "", "STUDYQ_BROKER_URL": "", **by_file}
        pid = os.getpid()
        workers += [
            WorkerProcess(f"canary-file-{pid}", queue=QUEUE, database_url="", log_dir=logs,
                          via_cli=True, env=only_files),
            WorkerProcess(f"canary-env-{pid}", queue=QUEUE, database_url=database.url(),
                          log_dir=logs, via_cli=True, env=by_env),
            # A worker whose database does not exist: it warns at start, naming the URL.
            WorkerProcess(f"canary-nodb-{pid}", queue=f"{QUEUE}-unused", database_url="",
                          log_dir=logs, concurrency=1, pool="solo", via_cli=True,
                          env=missing_db_env),
        ]  # fmt: skip
        for worker in workers:
            worker.wait_ready()
        flower.wait_ready()
        pids = [flower.process.pid, *(worker.process.pid for worker in workers)]
        transcript.add("command lines of flower and the workers", command_lines(pids))
        wait = ["--timeout", "60", "--no-progress"]
        run(
            ("wait-a", ["wait", "canary-a", *wait], {**by_file, **quick}),
            ("wait-b", ["wait", "canary-b", *wait], {**by_env, **quick}),
            ("check-dead-db", ["check"], dead_db_file),
            ("check-dead-broker", ["check"], dead_broker_env),
            ("status-missing-db", ["status", "canary-a"], missing_db_file),
            ("upgrade-missing-db", ["db", "upgrade"], missing_db_env),
            ("submit-wrong-password", ["submit", studies["canary-c"]], wrong_password_env),
        )
        run(
            ("status", ["status"], by_file),
            ("status-b", ["status", "canary-b"], by_env),
            ("export-a", ["export", "canary-a", "--out", str(root / "out-a")], by_file),
            ("export-b", ["export", "canary-b", "--out", str(root / "out-b")], by_env),
        )
        for name in ("out-a", "out-b"):
            for path, content in read_tree(root / name).items():
                result.artifacts[f"{name}/{path}"] = content
        workers[2].wait_for_log("unavailable at start", timeout=20)
        for path in ("/api/tasks", "/api/workers?refresh=1", "/api/queues/length"):
            status, body = flower.get(path)
            result.flower[path] = f"{status} {body}"
        result.flower["/api/tasks without auth"] = str(flower.get("/api/tasks", auth=False)[0])
        result.redis_keys.append(redis_dump(redis_server.client))
        result.postgres = postgres_dump(database.name)
    finally:
        stops = [worker.terminate for worker in workers] + [flower.terminate]
        with ThreadPoolExecutor(max_workers=len(stops)) as pool:
            list(pool.map(lambda stop: stop(), stops))
        for worker in workers:
            transcript.add(f"log of worker {worker.name}", worker.log)
        transcript.add("log of studyq flower", flower.log)
        transcript.add("log of redis-server", redis_server.log)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sweep]:
    canary = make_canary()
    with contextlib.ExitStack() as cleanup:
        redis_server = CanaryRedis(canary)
        cleanup.callback(redis_server.close)
        database = CanaryDatabase(canary)
        cleanup.callback(database.close)
        result = Sweep(canary, redis_server, database)
        _scenario(result, tmp_path_factory.mktemp("canary"))
        yield result


def _show(captured: Captured) -> str:
    return f"{captured.what} (exit {captured.returncode}):\n{captured.text}"


def test_the_sweep_really_ran(sweep: Sweep) -> None:
    """The leak checks below mean something only if every command did its work."""
    succeed = ["upgrade", "check-file", "submit-a", "submit-b", "wait-a", "wait-b", "status",
               "status-b", "export-a", "export-b"]  # fmt: skip
    fail = ["check-dead-db", "check-dead-broker", "status-missing-db", "upgrade-missing-db",
            "submit-wrong-password"]  # fmt: skip
    for name in succeed:
        assert sweep.commands[name].returncode == 0, _show(sweep.commands[name])
    for name in fail:
        assert sweep.commands[name].returncode not in (0, None), _show(sweep.commands[name])
    for name in ("wait-a", "wait-b"):
        assert f"{RUNS_PER_STUDY} succeeded, 0 failed" in sweep.commands[name].text
    assert any(path.endswith("runs.csv") for path in sweep.artifacts), sorted(sweep.artifacts)
    tasks = json.loads(sweep.flower["/api/tasks"].partition(" ")[2])
    assert len(tasks) >= 2 * RUNS_PER_STUDY, tasks
    # Flower followed each run to its end through the workers' batched task events
    succeeded = [task for task in tasks.values() if task.get("state") == "SUCCESS"]
    assert len(succeeded) >= 2 * RUNS_PER_STUDY, tasks
    assert sweep.flower["/api/workers?refresh=1"].startswith("200 ")
    assert sweep.flower["/api/tasks without auth"] == "401"
    assert "canary-a" in sweep.postgres and "canary-b" in sweep.postgres


def test_the_canary_is_in_no_output_and_no_log(sweep: Sweep) -> None:
    leaks = {
        item.what: found
        for item in sweep.transcript.items
        if (found := find_canary(item.text, sweep.canary))
    }
    assert not leaks, f"the canary password was printed ({leaks}):\n" + "\n\n".join(
        _show(item) for item in sweep.transcript.items if item.what in leaks
    )


def test_the_canary_is_not_in_the_exported_artifacts(sweep: Sweep) -> None:
    leaks = [
        path
        for path, content in sweep.artifacts.items()
        if find_canary(content.decode("utf-8", errors="replace"), sweep.canary)
    ]
    assert sweep.artifacts
    assert not leaks, f"the canary is in the artifact files {leaks}"


def test_the_canary_is_not_in_the_database(sweep: Sweep) -> None:
    assert not find_canary(sweep.postgres, sweep.canary), [
        line for line in sweep.postgres.splitlines() if find_canary(line, sweep.canary)
    ]


def _message_bodies(dump: str) -> list[str]:
    """The decoded (base64) bodies of the Celery messages in a :func:`redis_dump`."""
    return [
        base64.b64decode(match.group(1)).decode("utf-8", errors="replace")
        for match in re.finditer(r'"body":\s*"([^"]*)"', dump)
    ]


def test_the_canary_is_not_in_redis(sweep: Sweep) -> None:
    queued, final = sweep.redis_keys
    bodies = "\n".join(_message_bodies(queued))
    assert "canary-a" in bodies and "canary-b" in bodies, f"no run message seen:\n{queued}"
    for dump in (queued, final, bodies):
        leaks = [line for line in dump.splitlines() if find_canary(line, sweep.canary)]
        assert not leaks, leaks


def test_the_canary_is_not_in_flower(sweep: Sweep) -> None:
    for path, body in sweep.flower.items():
        assert not find_canary(body, sweep.canary), f"{path}: {body}"


def test_urls_are_printed_masked(sweep: Sweep) -> None:
    """Where studyq prints a URL it prints the masked form, in both ways of passing it."""
    db = sweep.database.masked_url()  # "://role:***@host:port/name": the driver varies
    broker = sweep.redis.masked_url()
    missing = db.rpartition("/")[0] + "/no_such_db"
    must_show = {
        "upgrade": [f"{db}: schema"],
        "check-file": [f"database postgresql{db}: ok", f"broker {broker}: ok"],
        "check-dead-db": [f"{sweep.database.role}:{MASK}@{HOST}:", "UNREACHABLE"],
        "check-dead-broker": [f"database postgresql{db}: ok", f"broker redis://:{MASK}@{HOST}:"],
        "status-missing-db": [missing],
        "upgrade-missing-db": [missing],
        "submit-wrong-password": [broker],
    }
    for name, needles in must_show.items():
        captured = sweep.commands[name]
        for needle in needles:
            assert needle in captured.text, f"{needle!r} not shown:\n{_show(captured)}"
    logs = {item.what: item.text for item in sweep.transcript.items}
    for worker in ("file", "env"):
        log = logs[f"log of worker canary-{worker}-{os.getpid()}"]
        assert f"studyq worker: broker {broker}" in log, log
        assert f"database postgresql{db}" in log, log
    nodb = logs[f"log of worker canary-nodb-{os.getpid()}"]
    assert missing in nodb, nodb
    assert f"for broker {broker}" in logs["log of studyq flower"]
