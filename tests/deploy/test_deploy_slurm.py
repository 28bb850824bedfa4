"""deploy/slurm/studyq-workers.sbatch, run with plain ``bash`` and the SLURM_* variables a
job array task would have (there is no sbatch here).

The fast tests put a stand-in for Python on STUDYQ_PYTHON that records how it was started
and which signals reached it. The integration test starts two real workers (two array
tasks) against the local Redis and PostgreSQL, connected as the studyq_worker role, lets them
finish a sweep, then sends SIGTERM to the scripts as Slurm does before the time limit.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import yaml
from deploy_files import REPO
from deploy_pg import RolesCluster, unavailable

SCRIPT = REPO / "deploy" / "slurm" / "studyq-workers.sbatch"
FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for `python -m orchestrator.cli worker ...`: records its arguments, environment
# and the signals it gets, and shuts down like a worker (it takes FAKE_SHUTDOWN_S).
printf '%s\\n' "$@" > "$FAKE_DIR/argv"
env | grep '^STUDYQ_' | sort > "$FAKE_DIR/env"
pool_process() {
    trap 'echo TERM >> "$FAKE_DIR/pool-signals"; exit 0' TERM
    while :; do sleep 0.05; done
}
pool_process &
pool_pid=$!
on_term() {
    echo TERM >> "$FAKE_DIR/signals"
    sleep "${FAKE_SHUTDOWN_S:-0.2}"
    kill -KILL "$pool_pid"
    echo finished > "$FAKE_DIR/done"
    exit "${FAKE_EXIT:-0}"
}
trap on_term TERM
if [ -n "${FAKE_EXIT_NOW:-}" ]; then kill -KILL "$pool_pid"; exit "$FAKE_EXIT_NOW"; fi
echo $$ > "$FAKE_DIR/pid"
while :; do sleep 0.05; done
"""


def _sbatch_options() -> dict[str, str]:
    options = {}
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("#SBATCH "):
            name, _, value = line.removeprefix("#SBATCH ").strip().partition("=")
            options[name] = value
    return options


def _default_grace_s() -> int:
    match = re.search(r"STUDYQ_SHUTDOWN_GRACE_S:-(\d+)", SCRIPT.read_text())
    assert match, "the script must default STUDYQ_SHUTDOWN_GRACE_S"
    return int(match.group(1))


def test_the_script_is_valid_bash_with_a_job_array_header() -> None:
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    options = _sbatch_options()
    assert re.fullmatch(r"\d+-\d+(%\d+)?", options["--array"]), "a job array of N tasks"
    assert options["--nodes"] == "1" and options["--ntasks"] == "1", "one worker per task"
    assert re.fullmatch(r"\d+(-\d+)?(:\d\d){1,2}", options["--time"])


def test_sigterm_reaches_the_batch_shell_early_enough_for_the_grace() -> None:
    """--signal=B:TERM@N: to the batch shell only (not the pool processes), N seconds before
    the limit, and N leaves a minute beyond the default shutdown grace for handing back."""
    match = re.fullmatch(r"B:TERM@(\d+)", _sbatch_options()["--signal"])
    assert match, "#SBATCH --signal=B:TERM@<seconds>"
    assert int(match.group(1)) >= _default_grace_s() + 60


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, str]:
    """The environment of an array task whose Python is the stand-in."""
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    broker_file = tmp_path / "broker_url"
    broker_file.write_text("redis://:secret@redis.example.org:6379/0\n")
    broker_file.chmod(0o600)
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_DIR": str(fake_dir),
        "STUDYQ_PYTHON": str(python),
        "STUDYQ_BROKER_URL_FILE": str(broker_file),
        "STUDYQ_DATABASE_URL": "postgresql://studyq_worker:secret@db.example.org/studyq",
        "SLURM_JOB_ID": "780",
        "SLURM_ARRAY_JOB_ID": "777",
        "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_CPUS_PER_TASK": "6",
        "SLURMD_NODENAME": "node17",
    }


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    try:
        return subprocess.Popen(
            ["bash", str(SCRIPT)],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a Slurm job step has
        )
    finally:
        handle.close()


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Make sure the script and everything in its process group are gone."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(10)


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_script_is_forwarded_to_the_worker_main_process_and_awaited(
    fake: dict[str, str], tmp_path: Path, sent: signal.Signals
) -> None:
    # Given the script running a worker that needs 1 s to shut down
    env = {**fake, "FAKE_SHUTDOWN_S": "1"}
    fake_dir = Path(env["FAKE_DIR"])
    process = _start(env, tmp_path / "task.log")
    try:
        _wait_for(lambda: (fake_dir / "pid").exists(), 10, "the worker to start")
        # When Slurm signals the batch shell
        started = time.monotonic()
        process.send_signal(sent)
        code = process.wait(15)
    finally:
        _stop(process)
    log = (tmp_path / "task.log").read_text()
    # Then the worker's main process got exactly one SIGTERM, its pool processes none, and
    # the script waited for the worker to finish before it exited with its status
    assert (fake_dir / "signals").read_text().split() == ["TERM"], log
    assert not (fake_dir / "pool-signals").exists(), "pool processes must not be signalled"
    assert (fake_dir / "done").exists()
    assert time.monotonic() - started >= 0.9
    assert code == 0, log
    assert f"received SIG{sent.name.removeprefix('SIG')}: warm shutdown" in log


def test_the_worker_is_started_with_the_task_s_settings(
    fake: dict[str, str], tmp_path: Path
) -> None:
    fake_dir = Path(fake["FAKE_DIR"])
    process = _start(fake, tmp_path / "task.log")
    try:
        _wait_for(lambda: (fake_dir / "pid").exists(), 10, "the worker to start")
    finally:
        _stop(process)
    argv = (fake_dir / "argv").read_text().splitlines()
    assert argv == [
        "-m", "orchestrator.cli", "worker",
        "--concurrency", "6",  # SLURM_CPUS_PER_TASK
        "--pool", "prefork",
        "--queues", "studyq",
        "--loglevel", "INFO",
        "--hostname", "studyq-777_3@%h",  # unique per array task
    ]  # fmt: skip
    env = (fake_dir / "env").read_text().splitlines()
    assert "STUDYQ_SHUTDOWN_GRACE_S=240" in env
    assert f"STUDYQ_BROKER_URL_FILE={fake['STUDYQ_BROKER_URL_FILE']}" in env
    log = (tmp_path / "task.log").read_text()
    assert "secret" not in log, "the script must never print a URL"


def test_the_settings_can_be_overridden(fake: dict[str, str], tmp_path: Path) -> None:
    env = {
        **fake,
        "STUDYQ_WORKER_CONCURRENCY": "3",
        "STUDYQ_WORKER_POOL": "threads",
        "STUDYQ_WORKER_QUEUES": "gpu,studyq",
        "STUDYQ_WORKER_LOGLEVEL": "DEBUG",
        "STUDYQ_SHUTDOWN_GRACE_S": "30",
    }
    fake_dir = Path(env["FAKE_DIR"])
    process = _start(env, tmp_path / "task.log")
    try:
        _wait_for(lambda: (fake_dir / "pid").exists(), 10, "the worker to start")
    finally:
        _stop(process)
    argv = (fake_dir / "argv").read_text().splitlines()
    assert argv[3:9] == ["--concurrency", "3", "--pool", "threads", "--queues", "gpu,studyq"]
    assert argv[9:11] == ["--loglevel", "DEBUG"]
    assert "STUDYQ_SHUTDOWN_GRACE_S=30" in (fake_dir / "env").read_text().splitlines()


def test_the_worker_s_exit_status_is_the_job_s(fake: dict[str, str], tmp_path: Path) -> None:
    env = {**fake, "FAKE_EXIT_NOW": "3"}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, timeout=20)
    assert done.returncode == 3
    assert b"worker exited with status 3" in done.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"STUDYQ_BROKER_URL_FILE": None}, "set STUDYQ_BROKER_URL or STUDYQ_BROKER_URL_FILE"),
        ({"STUDYQ_DATABASE_URL": None}, "set STUDYQ_DATABASE_URL or STUDYQ_DATABASE_URL_FILE"),
        ({"STUDYQ_BROKER_URL_FILE": "/nonexistent/broker_url"}, "is not a readable file"),
        ({"STUDYQ_PYTHON": "/nonexistent/python"}, "is not executable"),
        ({"STUDYQ_PYTHON": None}, "no studyq on PATH"),
    ],
)
def test_a_missing_setting_stops_the_task_before_anything_starts(
    fake: dict[str, str], change: dict[str, str | None], message: str
) -> None:
    env = {key: value for key, value in {**fake, **change}.items() if value is not None}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, timeout=20)
    assert done.returncode == 2
    assert message in done.stderr.decode()
    assert not (Path(fake["FAKE_DIR"]) / "argv").exists()


# -- real workers -----------------------------------------------------------------------------


def _descendants(root: int) -> dict[int, str]:
    """Every process below ``root``, with its start time (to tell a reused pid apart)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, started in children.get(todo.pop(), []):
            found[pid] = started
            todo.append(pid)
    return found


def _alive(pid: int, started: str) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == started and fields[0] != "Z"


def _write_study(path: Path, study_id: str, queue: str, **extra: object) -> Path:
    payload: dict[str, object] = {
        "study_id": study_id,
        "title": "slurm workers test",
        "problem_ids": ["noop"],
        "execution": {"queue": queue},
        **extra,
    }
    path.write_text(yaml.safe_dump(payload))
    return path


@pytest.fixture
def redis_broker() -> Iterator[tuple[str, str]]:
    """(broker URL, queue): the local Redis, a queue of this test's own, deleted after."""
    port = int(os.environ.get("STUDYQ_TEST_REDIS_PORT", "6379"))
    client = redis.Redis(host="127.0.0.1", port=port, db=15, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as error:
        unavailable(f"Redis at 127.0.0.1:{port} is not usable: {error}")
    queue = f"studyq-slurm-{uuid.uuid4().hex[:10]}"
    yield f"redis://127.0.0.1:{port}/15", queue
    client.delete(queue, f"_kombu.binding.{queue}")
    client.close()


@pytest.mark.integration
@pytest.mark.slow
def test_array_tasks_run_a_sweep_as_the_worker_role_and_stop_warmly_on_sigterm(
    roles_cluster: RolesCluster, redis_broker: tuple[str, str], tmp_path: Path
) -> None:
    from orchestrator.contracts.settings import Settings
    from orchestrator.distributed import submit_study, wait_study
    from orchestrator.store import ResultStore

    roles = roles_cluster.roles
    database = roles_cluster.prepared_database("slurm")
    broker, queue = redis_broker
    coordinator_url = roles.url("coordinator", database)
    settings = Settings(database_url=coordinator_url, broker_url=broker, reconcile_interval_s=0.5)
    # Given two array tasks of the job, with their URLs in files (the worker's database URL
    # is the studyq_worker role's)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    (secrets_dir / "broker_url").write_text(broker + "\n")
    (secrets_dir / "db_url").write_text(
        roles.url("worker", database).replace("postgresql+psycopg://", "postgresql://")
    )
    tasks = []
    for task in (0, 1):
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "STUDYQ_PYTHON": sys.executable,
            "STUDYQ_BROKER_URL_FILE": str(secrets_dir / "broker_url"),
            "STUDYQ_DATABASE_URL_FILE": str(secrets_dir / "db_url"),
            "STUDYQ_WORKER_QUEUES": queue,
            "STUDYQ_SHUTDOWN_GRACE_S": "1",
            "SLURM_JOB_ID": str(900 + task),
            "SLURM_ARRAY_JOB_ID": "900",
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_CPUS_PER_TASK": "2",
            "PYTHONUNBUFFERED": "1",
        }
        tasks.append((_start(env, tmp_path / f"task{task}.log"), tmp_path / f"task{task}.log"))

    def logs() -> str:
        return "\n".join(path.read_text(errors="replace") for _, path in tasks)

    try:
        for task, (_, log) in enumerate(tasks):
            _wait_for(
                lambda log=log, task=task: (
                    f"studyq-900_{task}@" in log.read_text() and " ready." in log.read_text()
                ),
                60,
                f"array task {task}'s worker to be ready:\n{logs()}",
            )
        # When a sweep is submitted, the workers finish it
        quick = _write_study(
            tmp_path / "quick.yaml", f"slurm-quick-{uuid.uuid4().hex[:6]}", queue,
            agent_specs=["noop"], run_budget={"replicates": 8},
        )  # fmt: skip
        submitted = submit_study(quick, settings=settings, show_progress=False)
        report = wait_study(
            submitted.study_id, settings=settings, show_progress=False, timeout_s=90
        )
        assert report.complete and report.counts["success"] == 8, logs()
        with ResultStore.open(coordinator_url) as store:
            owners = {a.worker.split("@")[0] for a in store.iter_attempts(submitted.study_id)}
        assert owners <= {"studyq-900_0", "studyq-900_1"}, owners

        # And given long runs executing on both workers
        slow = _write_study(
            tmp_path / "slow.yaml", f"slurm-slow-{uuid.uuid4().hex[:6]}", queue,
            agent_specs=["sleep"], run_budget={"replicates": 6},
            factors=[{"name": "sleep_s", "kind": "manipulated",
                      "levels": [{"name": "long", "value": 120}]}],
            design_spec={"kind": "full_factorial"},
        )  # fmt: skip
        long_study = submit_study(slow, settings=settings, show_progress=False).study_id
        with ResultStore.open(coordinator_url) as store:
            _wait_for(
                lambda: store.count_by_status(long_study)["running"] == 4,
                30,
                f"4 runs to be running:\n{logs()}",
            )
        trees = {process.pid: _descendants(process.pid) for process, _ in tasks}
        assert all(len(tree) >= 3 for tree in trees.values()), trees  # main + 2 pool

        # When Slurm sends SIGTERM to the batch shells before the time limit
        started = time.monotonic()
        for process, _ in tasks:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(60) for process, _ in tasks]
        elapsed = time.monotonic() - started
    finally:
        for process, _ in tasks:
            _stop(process)

    # Then the scripts exit soon, successfully, their workers are gone, and the runs that
    # were executing are queued again without an attempt charged
    assert codes == [0, 0], logs()
    assert elapsed < 45, logs()
    for tree in trees.values():
        assert not [pid for pid, born in tree.items() if _alive(pid, born)], logs()
    with ResultStore.open(coordinator_url) as store:
        counts = store.count_by_status(long_study)
        assert counts["running"] == 0 and counts["queued"] == 6, counts
        runs = list(store.iter_runs(long_study))
        assert {(run.attempts_used, run.lease_owner) for run in runs} == {(0, None)}
        outcomes = sorted(a.outcome for a in store.iter_attempts(long_study))
        assert outcomes == ["released"] * 4
        store.cancel(long_study)
