"""Benchmark: PostgreSQL connections of studyq workers, directly and through PgBouncer.
Results and analysis: docs/deploy.md, "Connections and PgBouncer". Not run in CI.

Run from the repository root (Redis on 127.0.0.1:6379; ``pgbouncer`` and PostgreSQL's
``initdb``/``pg_ctl`` installed)::

    .venv/bin/python bench/connections.py footprint            # -P prefork/threads, -c 2/8/32
    .venv/bin/python bench/connections.py cluster              # 64 worker processes, 2 ways
    .venv/bin/python bench/connections.py prepare              # server-side prepare or not
    .venv/bin/python bench/connections.py all

Every part runs against a PostgreSQL of its own (``initdb`` into a temporary directory, on a
free port, ``max_connections = 100``, removed at the end: tests/faults/fault_services.py's
``OwnPostgres``), so neither the shared server's other clients nor this benchmark disturb the
other; PgBouncer is tests/pgbouncer.py's (transaction mode, ``default_pool_size = 20``). The
broker is Redis database 12 with queue names of this run's own, deleted afterwards.

footprint
    One ``celery -A workers.app worker -P <pool> -c <n>`` at a time drains ``8 * n`` runs of
    the ``sleep`` demo agent (0.1 s each, so every slot is busy at once); its connections are
    the server's ``pg_stat_activity`` rows with the worker's ``PGAPPNAME``, sampled every
    20 ms: the peak while draining and what stays open once it is idle. Counts, not timings.
cluster
    64 worker processes: 6 prefork workers ``-c 10`` (60 pool children, each a process that
    executes runs and holds its own store) and 4 threads workers ``-c 8`` (4 processes), as
    in tests/distributed/test_through_pgbouncer.py, drain 640 runs of 0.1 s directly and then
    through PgBouncer (the order alternates with ``--repeats``). Reported: peak server
    connections, the connection errors the workers logged (``too many clients``, ``remaining
    connection slots``), whether every run ended ``success`` and how long the drain took.
prepare
    What psycopg's server-side prepared statements save on a worker's own statements (its
    claim and its release, the single statements of every run): ``--rounds`` claim + release
    pairs of one run, on one connection with ``prepare_threshold`` 5 (psycopg's default)
    and ``none``, in alternating blocks; the figure is the ratio of the two medians.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "faults")]

from fault_services import OwnPostgres  # noqa: E402
from pgbouncer import PgBouncer  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from orchestrator.contracts.settings import Settings  # noqa: E402
from orchestrator.distributed import submit_study  # noqa: E402
from orchestrator.store import ResultStore, upgrade  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/12"
SLEEP_S = 0.1
CONNECTION_ERRORS = re.compile(
    r"too many clients|remaining connection slots|connection refused|no more connections",
    re.IGNORECASE,
)
"""What PostgreSQL (and PgBouncer) answer a connection they cannot take."""


def write_study(directory: Path, runs: int, queue: str) -> tuple[Path, str]:
    study_id = f"conn-{uuid.uuid4().hex[:8]}"
    path = directory / f"{study_id}.yaml"
    path.write_text(
        f"""\
study_id: {study_id}
title: connection benchmark
factors:
  - name: sleep_s
    levels:
      - {{name: s, value: {SLEEP_S}}}
agent_specs: [sleep]
problem_ids: [noop]
design_spec:
  kind: full_factorial
run_budget:
  replicates: {runs}
execution:
  queue: {queue}
""",
        encoding="utf-8",
    )
    return path, study_id


@dataclass
class Worker:
    """One ``celery -A workers.app worker`` subprocess, signalled only by its pid."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(
        cls, name: str, *, pool: str, concurrency: int, queue: str, url: str, tmp: Path
    ) -> Worker:
        log_path = tmp / f"{name}.log"
        env = dict(os.environ)
        env.update(
            STUDYQ_DATABASE_URL=url,
            STUDYQ_BROKER_URL=REDIS_URL,
            PGAPPNAME=name,
            PYTHONPATH=str(REPO),
            STUDYQ_RESULT_RETRY_S="120",
        )
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.app", "worker",
                 "--without-gossip", "--without-mingle", "--without-heartbeat",
                 "-P", pool, "-c", str(concurrency), "-Q", queue, "-l", "INFO",
                 "-n", f"{name}@bench"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        return cls(name, process, log_path)

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"{self.name}@bench ready." in self.log:
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.log[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready after {timeout} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@contextlib.contextmanager
def workers(
    specs: list[tuple[str, str, int]], *, queue: str, url: str, tmp: Path
) -> Iterator[list[Worker]]:
    started = [
        Worker.start(name, pool=pool, concurrency=c, queue=queue, url=url, tmp=tmp)
        for name, pool, c in specs
    ]
    try:
        for worker in started:
            worker.wait_ready()
        yield started
    finally:
        for worker in started:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        for worker in started:
            worker.stop()
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for key in list(client.scan_iter(match=f"*{queue}*")):
            client.delete(key)
        client.close()


def connections(admin_url: str, database: str) -> dict[str, int]:
    """Server connections to ``database`` by ``application_name``."""
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT application_name, count(*) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid() GROUP BY 1"
                ),
                {"d": database},
            ).all()
        return {str(name): int(count) for name, count in rows}
    finally:
        engine.dispose()


def drain(
    study: Path, study_id: str, *, url: str, admin_url: str, database: str, runs: int,
    timeout: float,
) -> tuple[bool, float, dict[str, int]]:  # fmt: skip
    """Submit, then sample connections until every run is ``success``: (done, seconds, peak
    per application name and ``*`` for the total)."""
    settings = Settings(database_url=url, broker_url=REDIS_URL)
    submit_study(study, settings=settings, show_progress=False)
    store = ResultStore.open(url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_size=1)
    peak: dict[str, int] = {}
    start = time.monotonic()
    done = False
    try:
        with admin.connect() as connection:
            while time.monotonic() - start < timeout:
                rows = connection.execute(
                    text(
                        "SELECT application_name, count(*) FROM pg_stat_activity "
                        "WHERE datname = :d AND pid <> pg_backend_pid() GROUP BY 1"
                    ),
                    {"d": database},
                ).all()
                total = 0
                for name, count in rows:
                    peak[str(name)] = max(peak.get(str(name), 0), int(count))
                    total += int(count)
                peak["*"] = max(peak.get("*", 0), total)
                if store.count_by_status(study_id).get("success", 0) >= runs:
                    done = True
                    break
                time.sleep(0.02)
    finally:
        store.close()
        admin.dispose()
    return done, time.monotonic() - start, peak


@contextlib.contextmanager
def own_database() -> Iterator[tuple[OwnPostgres, str, str]]:
    """A private server (max_connections=100) with a migrated database ``bench``."""
    server = OwnPostgres()
    try:
        admin = server.url("postgres")
        engine = create_engine(admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text("CREATE DATABASE bench"))
        engine.dispose()
        upgrade(server.url("bench"))
        yield server, admin, "bench"
    finally:
        server.close()


def footprint(concurrencies: list[int]) -> str:
    lines = [
        "| pool | -c | peak connections while draining | per slot | idle after |",
        "|---|---|---|---|---|",
    ]
    with own_database() as (server, admin, database), tempfile.TemporaryDirectory() as tmp:
        url = server.url(database)
        for pool in ("prefork", "threads"):
            for c in concurrencies:
                name = f"fp-{pool}-{c}-{os.getpid()}"
                queue = f"studyq-bench-conn-{uuid.uuid4().hex[:8]}"
                runs = 8 * c
                study, study_id = write_study(Path(tmp), runs, queue)
                with workers([(name, pool, c)], queue=queue, url=url, tmp=Path(tmp)):
                    done, _, peak = drain(
                        study, study_id, url=url, admin_url=admin, database=database,
                        runs=runs, timeout=300,
                    )  # fmt: skip
                    time.sleep(1.0)
                    idle = connections(admin, database).get(name, 0)
                got = peak.get(name, 0)
                note = "" if done else " (not drained)"
                lines.append(f"| {pool} | {c} | {got}{note} | {got / c:.2f} | {idle} |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


CLUSTER = [
    *((f"pf{i}", "prefork", 10) for i in range(6)),
    *((f"th{i}", "threads", 8) for i in range(4)),
]
"""64 worker processes: 60 prefork pool children and 4 threads-pool processes."""


def cluster(repeats: int, runs: int) -> str:
    lines = [
        "| path | peak server connections | connection errors logged | all success | drain s |",
        "|---|---|---|---|---|",
    ]
    with own_database() as (server, admin, database), tempfile.TemporaryDirectory() as tmp:
        direct = server.url(database)
        for repeat in range(repeats):
            order = ["direct", "pgbouncer"] if repeat % 2 == 0 else ["pgbouncer", "direct"]
            for path in order:
                bouncer = PgBouncer(server_port=server.port) if path == "pgbouncer" else None
                try:
                    url = direct if bouncer is None else bouncer.url(database)
                    queue = f"studyq-bench-conn-{uuid.uuid4().hex[:8]}"
                    study, study_id = write_study(Path(tmp), runs, queue)
                    specs = [(f"{n}-{path}-{repeat}-{os.getpid()}", p, c) for n, p, c in CLUSTER]
                    with workers(specs, queue=queue, url=url, tmp=Path(tmp)) as started:
                        done, seconds, peak = drain(
                            study, study_id, url=url, admin_url=admin, database=database,
                            runs=runs, timeout=180,
                        )  # fmt: skip
                        errors = sum(len(CONNECTION_ERRORS.findall(w.log)) for w in started)
                finally:
                    if bouncer is not None:
                        bouncer.close()
                lines.append(
                    f"| {path} | {peak.get('*', 0)} | {errors} | {'yes' if done else 'no'} "
                    f"| {seconds:.1f} |"
                )
                print(lines[-1], flush=True)
    return "\n".join(lines)


def prepare(rounds: int, blocks: int) -> str:
    from orchestrator.embedded import register
    from orchestrator.store import create_engine_for
    from orchestrator.study.model import parse_study
    from orchestrator.study.plan import prepare as plan

    with own_database() as (server, _admin, database), tempfile.TemporaryDirectory() as tmp:
        url = server.url(database)
        study, study_id = write_study(Path(tmp), 1, "studyq-bench-prepare")
        import yaml

        setup = ResultStore.open(url)
        register(setup, plan(parse_study(yaml.safe_load(study.read_text()))))
        setup.mark_queued(study_id, [0])
        setup.close()
        times: dict[str, list[float]] = {"5": [], "none": []}
        stores = {
            key: ResultStore(create_engine_for(f"{url}?prepare_threshold={key}")) for key in times
        }
        try:
            for block in range(blocks):
                for key in ("5", "none") if block % 2 == 0 else ("none", "5"):
                    store = stores[key]
                    start = time.perf_counter()
                    for _ in range(rounds):
                        (claim,) = store.claim_runs(study_id, [0], worker="bench:1", lease_s=60)
                        store.release_run(claim)
                    times[key].append((time.perf_counter() - start) / rounds * 1000)
        finally:
            for store in stores.values():
                store.close()
    prepared, plain = statistics.median(times["5"]), statistics.median(times["none"])
    return (
        "| prepare_threshold | claim + release, ms (median of blocks) | ratio to 5 |\n"
        "|---|---|---|\n"
        f"| 5 (psycopg default) | {prepared:.3f} "
        f"[{min(times['5']):.3f}-{max(times['5']):.3f}] | 1.00 |\n"
        f"| none | {plain:.3f} [{min(times['none']):.3f}-{max(times['none']):.3f}] "
        f"| {plain / prepared:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["footprint", "cluster", "prepare", "all"])
    parser.add_argument("--concurrency", default="2,8,32", help="footprint's -c values")
    parser.add_argument("--repeats", type=int, default=1, help="cluster's repeats")
    parser.add_argument("--runs", type=int, default=640, help="cluster's runs")
    parser.add_argument("--rounds", type=int, default=300, help="prepare's pairs per block")
    parser.add_argument("--blocks", type=int, default=8, help="prepare's blocks")
    args = parser.parse_args(argv)
    parts = ["footprint", "cluster", "prepare"] if args.part == "all" else [args.part]
    out = []
    for part in parts:
        if part == "footprint":
            out.append(footprint([int(c) for c in args.concurrency.split(",")]))
        elif part == "cluster":
            out.append(cluster(args.repeats, args.runs))
        else:
            out.append(prepare(args.rounds, args.blocks))
    print("\n\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
