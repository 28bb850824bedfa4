"""Benchmark: distributed sweeps (``studyq submit`` + Celery workers) against raw Celery,
on Redis and on RabbitMQ side by side in one invocation, each broker against raw Celery on
that same broker. Results and analysis: docs/benchmarks.md.

Run from the repository root (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432,
RabbitMQ on 127.0.0.1:5672 with a vhost ``studyq_bench`` for guest: ``rabbitmqctl add_vhost
studyq_bench && rabbitmqctl set_permissions -p studyq_bench guest ".*" ".*" ".*"``)::

    .venv/bin/python bench/distributed.py --save run.json   # both brokers, 3 repeats (~10 min)
    .venv/bin/python bench/distributed.py --broker redis    # one broker (redis or rabbitmq)
    .venv/bin/python bench/distributed.py --broker redis --sizes 100000,5000,2000 --extras
                                                        # the 2026-11-29 tables (~20 min)
    .venv/bin/python bench/distributed.py --quick       # smaller sizes, 1 repeat
    .venv/bin/python bench/distributed.py --only b      # one part (a, b or c; repeatable)
    .venv/bin/python bench/distributed.py --from run.json   # print a saved run's tables
    .venv/bin/python bench/distributed.py --profile DIR     # where studyq's time per run goes
    .venv/bin/python bench/distributed.py --profile DIR --only c --gil  # who holds the GIL

What it measures (ANCHORS.md section 2's method; the machine is shared and noisy, so each
baseline is measured in the same repeat as studyq's figure, back to back, on the same
broker, the order alternating between repeats; in each part the brokers go back to back,
their order alternating too; every figure is the median of ``--repeats`` with [min-max];
ratios are medians of the per-repeat ratios). ``--broker`` (default ``both``) picks the
brokers; the first table puts them side by side, then come each broker's own tables.

On RabbitMQ studyq's run queues are quorum queues (``orchestrator.contracts.broker``) and
its publisher waits for pipelined publisher confirms; raw Celery's queues are quorum queues
too by default (``task_create_missing_queue_type``; ``--raw-queue-type classic`` for
comparison), and its ``apply_async`` publishes without confirms, as stock Celery does. The
raw tasks record their completions in Redis on either broker (``bench/_raw_app.py``).

(a) **Publishing N runs** (``--sizes``; default 20,000; the goal was set at 100,000).
    studyq: ``orchestrator.distributed.submit_study`` (what
    ``studyq submit`` calls) on a study file of N ``noop`` runs, in a fresh child
    process with the modules imported before the clock starts. Its time is split by
    wrapping ``prepare``, ``register`` and ``CeleryTransport.publish`` in the child (product
    code is not changed): *publish* is everything after registration, i.e. the loop that
    marks pages of runs ``queued`` in PostgreSQL (the next page on a second thread) and
    publishes them (a run message per run; a ``task-sent`` event per run too only with
    ``--sent-events``, i.e. ``STUDYQ_TASK_SENT_EVENTS=1``, the events in batches), split
    into the time spent in ``CeleryTransport.publish`` and the rest (waiting for the next
    page); *total* is prepare + register (``COPY`` on PostgreSQL) + publish. For reference
    the child then publishes the same runs again through a second ``CeleryTransport`` with
    ``sent_events=False`` (the broker side alone, no store pages).
    Baseline: a plain ``task.apply_async(args=[key], queue=q)`` loop of N trivial tasks on
    the same broker, in a fresh child (ANCHORS: ~2,000 tasks/s on Redis). Queue lengths are
    checked.
(b) **N no-op runs end to end** (default 3,000; the goal was set at 5,000) on one
    ``celery -A workers.app worker -P prefork -c 2 --without-gossip --without-mingle
    --without-heartbeat -l WARNING`` with the runs
    pre-enqueued (``submit_study``; set-up, not timed). The clock starts at the worker's
    ``worker_ready`` signal (worker boot excluded) and stops at the last run recorded in the
    store (``max(ended_at)`` once every run is ``success``). Baseline, same flags, same
    pre-enqueued count: raw Celery no-op tasks (``bench/_raw_app.py``: JSON,
    ``task_ignore_result``, each task records its completion with one pipelined Redis round
    trip, as in ANCHORS) with studyq's delivery settings (``acks_late``, prefetch 1).
    Also, the peer of issue 14's goal: the ANCHORS "stack floor" (raw tasks that each
    UPSERT one row into PostgreSQL in their own transaction). ``--extras`` adds: studyq with
    durable claims; raw Celery with Celery's defaults (prefetch 4, ``acks_late`` off); raw
    no-op tasks with task events on (flushed as stock Celery does).
(c) **2,000 runs that sleep 20 ms** (the ``sleep`` demo agent, factor ``sleep_s``) on
    ``-P threads -c 32``, same clock, against raw Celery 20 ms sleep tasks on the same pool
    (``--extras``: and with task events on) and the ideal ``2000 * 0.02 / 32 = 1.25 s``.

For every drain it also reports CPU per task of the worker's main process and pool children
(``/proc``), and of the PostgreSQL backends the worker opened (found by ``PGAPPNAME``).

The worker is started through a two-line launcher (``python -c``) that connects a
``worker_ready`` receiver writing ``time.time()`` to a file, then runs Celery's own
``celery`` command with the argv above, so the clock starts exactly where ANCHORS starts it.

Goals: (a) publish part >= 8x the ``apply_async`` loop and the whole submit >= 5x; (b) >= 50 %
of raw Celery's no-op rate (the same-settings baseline); (c) >= 80 % of raw Celery's 20 ms
rate. ``--check`` exits 1 when a goal is missed.

``--profile DIR`` calls ``workers.runtask.run_delivery`` serially in this process (no Celery)
and prints wall/CPU/statements per phase (claim, execute, finish, other), then runs (b)'s
studyq side once under ``py-spy record`` (``.venv/bin/pip install py-spy``), stacks to DIR.

Isolation: Redis database ``--redis-db`` (default 12) with unique queue names, only this
run's keys deleted; RabbitMQ vhost of ``--amqp-url`` (default ``studyq_bench``), only the
queues this run named deleted (with their dead-letter queues); a throwaway PostgreSQL
database ``studyq_bench_dist_<pid>_<hex>``, dropped at the end; worker logs in a fresh
temporary directory (kept with ``--keep``). Only processes this script started are
signalled, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO_ROOT / "bench"
HOST = "127.0.0.1"
PG_ADMIN_URL = f"postgresql+psycopg://postgres@{HOST}:5432/postgres"

PUBLISH_GOAL = 8.0  # publish part x the apply_async loop (issue 14)
SUBMIT_GOAL = 5.0  # whole submit (prepare + register + publish) x the apply_async loop
NOOP_GOAL = 1.0  # x raw Celery + one PostgreSQL UPSERT per task, the stack floor (issue 14)
SLEEP_GOAL = 0.8  # x raw Celery 20 ms rate
SLEEP_S = 0.02
THREADS = 32
PREFORK = 2

WORKER_FLAGS = ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]

# Runs `celery <argv>` with a worker_ready receiver that writes time.time() to $BENCH_READY
# (and, for the --switch-interval diagnostic only, sets the GIL switch interval).
_LAUNCHER = (
    "import os, sys, time\n"
    "from celery import signals\n"
    "def _ready(**_):\n"
    "    with open(os.environ['BENCH_READY'], 'w') as f: f.write(repr(time.time()))\n"
    "signals.worker_ready.connect(_ready, weak=False)\n"
    "if os.environ.get('BENCH_SWITCH_INTERVAL'):\n"
    "    sys.setswitchinterval(float(os.environ['BENCH_SWITCH_INTERVAL']))\n"
    "from celery.bin.celery import main\n"
    "sys.argv = ['celery', *sys.argv[1:]]\n"
    "sys.exit(main())\n"
)


# -- sizes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    publish: int = 20_000
    noop: int = 3_000
    sleep: int = 2_000


ISSUE = Sizes(publish=100_000, noop=5_000, sleep=2_000)
"""The sizes the goals were set at (``--sizes 100000,5000,2000``); the defaults are smaller
so that both brokers x 3 repeats fit in about 10 minutes on the 2-core machine."""


QUICK = Sizes(publish=20_000, noop=2_000, sleep=2_000)


# -- environment ------------------------------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anyone's STUDYQ_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STUDYQ_", "PG"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(BENCH_DIR)]),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Services:
    """This run's Redis database, throwaway PostgreSQL database and temporary directory."""

    redis_db: int
    tmp: Path
    db_name: str = field(
        default_factory=lambda: f"studyq_bench_dist_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    )
    keys: set[str] = field(default_factory=set)
    brokers: dict[str, Broker] = field(default_factory=dict)

    @property
    def broker(self) -> str:
        """The Redis broker URL (this run's database)."""
        return f"redis://{HOST}:6379/{self.redis_db}"

    @property
    def db_url(self) -> str:
        return f"postgresql+psycopg://postgres@{HOST}:5432/{self.db_name}"

    def redis(self) -> Any:
        import redis

        return redis.Redis(host=HOST, port=6379, db=self.redis_db)

    def queue(self, what: str) -> str:
        name = f"studyq-bench-{what}-{uuid.uuid4().hex[:8]}"
        self.keys.update({name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}"})
        return name

    def key(self, what: str) -> str:
        prefix = f"studyq-bench-{what}-{uuid.uuid4().hex[:8]}"
        self.keys.update({f"{prefix}:done", f"{prefix}:first", f"{prefix}:last"})
        return prefix

    def drop_keys(self, *names: str) -> None:
        """Delete the given keys (or all of this run's) -- only keys this run named."""
        targets = [n for n in (names or tuple(self.keys)) if n in self.keys]
        related = [
            k
            for n in targets
            for k in (n, f"_kombu.binding.{n}", f"_kombu.binding_permanent.{n}")
            if k in self.keys
        ]
        if related:
            self.redis().delete(*set(related))

    def create_db(self) -> None:
        from sqlalchemy import create_engine, text

        from orchestrator.store import upgrade

        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        admin.dispose()
        upgrade(self.db_url)
        engine = create_engine(self.db_url)
        with engine.begin() as connection:  # the "stack floor" table
            connection.execute(
                text("CREATE TABLE bench_floor (i integer PRIMARY KEY, payload text, n integer)")
            )
        engine.dispose()

    def drop_db(self) -> None:
        from sqlalchemy import create_engine, text

        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        admin.dispose()


BROKERS = ("redis", "rabbitmq")
LABELS = {"redis": "Redis", "rabbitmq": "RabbitMQ"}
AMQP_URL = f"amqp://guest:guest@{HOST}:5672/studyq_bench"


@dataclass
class Broker:
    """One broker the bench measures on: its URL, the queues this run named on it, their
    lengths. Redis queues are lists in :class:`Services`' database; RabbitMQ queues live in
    the bench's vhost and are deleted by name (with their dead-letter queue)."""

    kind: str  # "redis" | "rabbitmq"
    url: str
    svc: Services
    queues: set[str] = field(default_factory=set)

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    def queue(self, what: str) -> str:
        if self.kind == "redis":
            return self.svc.queue(what)
        name = f"studyq-bench-{what}-{uuid.uuid4().hex[:8]}"
        self.queues.add(name)
        return name

    @contextmanager
    def _channel(self) -> Iterator[Any]:
        from kombu import Connection  # type: ignore[attr-defined]

        with Connection(self.url, connect_timeout=5) as connection:  # type: ignore[no-untyped-call]
            channel = connection.channel()
            try:
                yield channel
            finally:
                if channel.is_open:
                    channel.close()

    def length(self, queue: str) -> int:
        """Messages in ``queue`` (RabbitMQ: ready messages, a passive declare; 0 if absent)."""
        if self.kind == "redis":
            return int(self.svc.redis().llen(queue))
        from amqp.exceptions import NotFound

        try:
            with self._channel() as channel:
                return int(channel.queue_declare(queue=queue, passive=True)[1])
        except NotFound:
            return 0

    def wait_length(self, queue: str, n: int, what: str) -> None:
        """Until ``queue`` holds ``n`` messages (RabbitMQ may still be enqueueing what an
        unconfirmed publisher sent just before it closed its connection)."""
        deadline = time.monotonic() + (0 if self.kind == "redis" else 30)
        while (length := self.length(queue)) != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: queue holds {length}, want {n}")
            time.sleep(0.1)

    def drop(self, *queues: str) -> None:
        """Delete the given queues (or all of this run's) -- only queues this run named."""
        if self.kind == "redis":
            self.svc.drop_keys(*queues)
            return
        from orchestrator.contracts.deadletters import dead_letter_key

        targets = [q for q in (queues or tuple(self.queues)) if q in self.queues]
        if not targets:
            return
        with self._channel() as channel:
            for name in targets:
                channel.queue_delete(queue=name)  # RabbitMQ: deleting a missing queue is ok
                channel.queue_delete(queue=dead_letter_key(name))
                self.queues.discard(name)

    def server_pid(self) -> int:
        """PID of the broker's server process on this machine (0 when not found), to read
        its CPU time from ``/proc`` (it is never signalled)."""
        comm = "redis-server" if self.kind == "redis" else "beam.smp"
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if (entry / "comm").read_text().strip() == comm:
                        return int(entry.name)
                except OSError:
                    continue
        return 0

    def check(self) -> None:
        """Connect once; a missing vhost or a refused login says how to fix it."""
        if self.kind == "redis":
            self.svc.redis().ping()
            return
        try:
            with self._channel():
                pass
        except Exception as exc:
            vhost = self.url.rpartition("/")[2]
            raise SystemExit(
                f"RabbitMQ at {self.url.rpartition('@')[2]} refused the bench "
                f"({type(exc).__name__}: {exc}). Create its vhost: rabbitmqctl add_vhost "
                f"{vhost} && rabbitmqctl set_permissions -p {vhost} guest '.*' '.*' '.*' "
                "(or pass --amqp-url, or --broker redis)"
            ) from exc


@contextmanager
def services(
    redis_db: int, keep: bool, brokers: tuple[str, ...] = ("redis",), amqp_url: str = AMQP_URL
) -> Iterator[Services]:
    tmp = Path(tempfile.mkdtemp(prefix="studyq-bench-dist-"))
    svc = Services(redis_db, tmp)
    # The binding tables the workers' event exchange leaves in this (dedicated) database.
    svc.keys.update({"_kombu.binding.celeryev", "_kombu.binding_deadlines"})
    svc.redis().ping()  # the raw tasks record their completions in Redis on either broker
    svc.brokers = {
        kind: Broker(kind, svc.broker if kind == "redis" else amqp_url, svc) for kind in brokers
    }
    for broker in svc.brokers.values():
        broker.check()
    svc.create_db()
    try:
        yield svc
    finally:
        try:
            for broker in svc.brokers.values():
                if broker.kind != "redis":
                    broker.drop()
            svc.drop_keys()
        finally:
            svc.drop_db()
            if keep:
                print(f"# logs kept in {tmp}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


# -- study files ------------------------------------------------------------------------------


def write_study(path: Path, study_id: str, *, agent: str, runs: int, queue: str) -> Path:
    """``runs`` runs of the demo ``agent`` on the ``noop`` problem: 2 prompt conditions x
    runs/2 replicates, factor ``sleep_s`` = 0.02 (read by the ``sleep`` agent)."""
    assert runs % 2 == 0
    path.write_text(
        f"""\
study_id: {study_id}
title: Distributed sweep benchmark ({agent})
factors:
  - name: prompt
    levels:
      - {{name: terse, value: terse}}
      - {{name: verbose, value: verbose}}
  - name: sleep_s
    levels:
      - {{name: s20ms, value: {SLEEP_S}}}
agent_specs: [{agent}]
problem_ids: [noop]
design_spec:
  kind: full_factorial
run_budget:
  replicates: {runs // 2}
seed_policy:
  base_seed: 20261129
execution:
  queue: {queue}
""",
        encoding="utf-8",
    )
    return path


# -- (a) publishing ---------------------------------------------------------------------------

_SUBMIT_CHILD = """\
import json, os, sys, time
import orchestrator.distributed as d
import orchestrator.executors.celery as transport_module
import workers.app, workers.tasks  # imports before the clock (as a worker host would)
from orchestrator.contracts.settings import load_settings

path, db, broker, quiet_queue, server = sys.argv[1:6]

def server_cpu():  # CPU seconds of the broker's server process (0 when not found)
    try:
        with open(f"/proc/{server}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

marks = {"broker_s": 0.0, "broker_cpu_s": 0.0}
items = []
_prepare, _register = d.prepare, d.register
_publish = transport_module.CeleryTransport.publish

def prepare(*args, **kwargs):
    start = time.perf_counter()
    try:
        return _prepare(*args, **kwargs)
    finally:
        marks["prepare"] = time.perf_counter() - start

def register(*args, **kwargs):
    start = time.perf_counter()
    try:
        return _register(*args, **kwargs)
    finally:
        marks["register_end"] = time.perf_counter()
        marks["register"] = marks["register_end"] - start

def publish(self, batch, **kwargs):
    batch = list(batch)
    start, cpu = time.perf_counter(), time.thread_time()
    try:
        return _publish(self, batch, **kwargs)
    finally:
        marks["broker_s"] += time.perf_counter() - start
        marks["broker_cpu_s"] += time.thread_time() - cpu
        items.extend(batch)

d.prepare, d.register = prepare, register
transport_module.CeleryTransport.publish = publish
settings = load_settings(database_url=db, broker_url=broker)
start = time.perf_counter()
report = d.submit_study(path, settings=settings, show_progress=False)
end = time.perf_counter()

# The same messages again, without task-sent events and without the store's pages
# (informative), through a transport like submit's (connected before the clock).
with transport_module.CeleryTransport(settings, broker) as quiet_transport:
    quiet_start, quiet_cpu, quiet_server = time.perf_counter(), time.process_time(), server_cpu()
    quiet = _publish(quiet_transport, items, queue=quiet_queue, timeout_s=None,
                     sent_events=False)
    quiet_s = time.perf_counter() - quiet_start
    quiet_cpu = time.process_time() - quiet_cpu
    quiet_server = server_cpu() - quiet_server
print(json.dumps({
    "published": report.published, "planned": report.planned, "quiet_published": quiet,
    "prepare_s": marks["prepare"], "register_s": marks["register"],
    "publish_s": end - marks["register_end"], "broker_s": marks["broker_s"],
    "total_s": end - start, "report_s": report.seconds, "quiet_s": quiet_s,
    "broker_cpu_s": marks["broker_cpu_s"], "quiet_cpu_s": quiet_cpu,
    "quiet_server_cpu_s": quiet_server,
}))
"""

_LOOP_CHILD = """\
import json, sys, time
from _raw_app import app, noop

n, queue, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with app.connection_for_write() as connection:
    connection.ensure_connection()
start = time.perf_counter()
for _ in range(n):
    noop.apply_async(args=[key], queue=queue)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _child_json(code: str, *args: str, env: dict[str, str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure_publish_studyq(
    svc: Services, broker: Broker, n: int, *, sent_events: bool = False
) -> dict[str, float]:
    queue = broker.queue("pub")
    quiet_queue = broker.queue("pubquiet")
    study_id = f"bench-pub-{uuid.uuid4().hex[:8]}"
    path = write_study(svc.tmp / f"{study_id}.yaml", study_id, agent="noop", runs=n, queue=queue)
    try:
        out = _child_json(
            _SUBMIT_CHILD,
            str(path),
            svc.db_url,
            broker.url,
            quiet_queue,
            str(broker.server_pid()),
            env=_clean_env(STUDYQ_TASK_SENT_EVENTS="1" if sent_events else "0"),
        )
        length, quiet_length = broker.length(queue), broker.length(quiet_queue)
        if out["published"] != n or length != n or quiet_length != n:
            raise RuntimeError(
                f"studyq published {out['published']}, queues hold {length} and "
                f"{quiet_length}, want {n}"
            )
    finally:
        broker.drop(queue, quiet_queue)
        _delete_study(svc, study_id)
    return {
        "publish_rate": n / out["publish_s"],
        "total_rate": n / out["total_s"],
        "quiet_rate": n / out["quiet_s"],
        "publish_s": out["publish_s"],
        "broker_s": out["broker_s"],
        "db_s": out["publish_s"] - out["broker_s"],
        "register_s": out["register_s"],
        "prepare_s": out["prepare_s"],
        "total_s": out["total_s"],
        "quiet_s": out["quiet_s"],
        # CPU per run in microseconds: the publishing thread inside CeleryTransport.publish;
        # the quiet publish's process, and the broker server's (it serves others too)
        "publish_cpu_us": out["broker_cpu_s"] / n * 1e6,
        "quiet_cpu_us": out["quiet_cpu_s"] / n * 1e6,
        "quiet_server_cpu_us": out["quiet_server_cpu_s"] / n * 1e6,
    }


def measure_publish_loop(
    svc: Services, broker: Broker, n: int, queue_type: str = "quorum"
) -> dict[str, float]:
    queue = broker.queue("loop")
    key = svc.key("loop")
    env = _clean_env(BENCH_BROKER=broker.url, BENCH_QUEUE_TYPE=queue_type)
    try:
        out = _child_json(_LOOP_CHILD, str(n), queue, key, env=env)
        broker.wait_length(queue, n, "apply_async loop")
    finally:
        broker.drop(queue)
    return {"rate": n / out["seconds"], "seconds": out["seconds"]}


def _delete_study(svc: Services, study_id: str) -> None:
    from orchestrator.store import ResultStore

    with ResultStore.open(svc.db_url) as store:
        store.delete_study(study_id)


# -- workers ----------------------------------------------------------------------------------


class Worker:
    """One ``celery ... worker`` started through the worker_ready launcher; signalled by PID."""

    def __init__(
        self,
        svc: Services,
        *,
        app: str,
        queue: str,
        pool: str,
        concurrency: int,
        env: dict[str, str],
        name: str,
    ) -> None:
        self.ready_file = svc.tmp / f"{name}.ready"
        self.log_path = svc.tmp / f"{name}.log"
        argv = [
            "-A",
            app,
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-Q",
            queue,
            "-n",
            f"{name}@bench",
            *WORKER_FLAGS,
        ]
        self.command = ["celery", *argv]
        self._log = self.log_path.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, *argv],
            cwd=REPO_ROOT,
            env=_clean_env(BENCH_READY=str(self.ready_file), PGAPPNAME=APP_NAME, **env),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 90.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                text = self.ready_file.read_text().strip()
                if text:
                    return float(text)
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker exited early; log:\n{self.log_path.read_text()[-4000:]}"
                )
            time.sleep(0.02)
        raise RuntimeError(
            f"worker not ready after {timeout} s; log:\n{self.log_path.read_text()[-4000:]}"
        )

    def cpu_s(self) -> tuple[float, float]:
        """CPU seconds of the worker's main process and of its current pool children."""
        return _cpu_s(self.process.pid), sum(_cpu_s(pid) for pid in self.children())

    def children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


_TICK = os.sysconf("SC_CLK_TCK")
APP_NAME = "studyq-bench-worker"
"""``PGAPPNAME`` of the measured workers, so their PostgreSQL backends can be found."""


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _pg_backend_cpu_s(svc: Services) -> float:
    """CPU seconds of the PostgreSQL backends the measured worker opened (PGAPPNAME)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(PG_ADMIN_URL)
    try:
        with engine.connect() as connection:
            pids = (
                connection.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity"
                        " WHERE datname = :d AND application_name = :a"
                    ),
                    {"d": svc.db_name, "a": APP_NAME},
                )
                .scalars()
                .all()
            )
    finally:
        engine.dispose()
    return sum(_cpu_s(pid) for pid in pids)


def _cpu_per_task(start: tuple[float, float], end: tuple[float, float], n: int) -> dict[str, float]:
    main, children = ((b - a) / n * 1e3 for a, b in zip(start, end, strict=True))
    return {"worker_cpu_ms": main + children, "main_cpu_ms": main, "child_cpu_ms": children}


def _wait_until(done: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def measure_studyq_drain(
    svc: Services,
    broker: Broker,
    *,
    agent: str,
    n: int,
    pool: str,
    concurrency: int,
    on_ready: Callable[[Worker], None] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, float]:
    """Pre-enqueue ``n`` runs with ``submit_study``, start a worker (``env``: extra
    settings), time ready -> last run."""
    from sqlalchemy import text

    from orchestrator.contracts.settings import load_settings
    from orchestrator.distributed import submit_study
    from orchestrator.store import ResultStore

    queue = broker.queue(f"{agent}")
    study_id = f"bench-{agent}-{uuid.uuid4().hex[:8]}"
    path = write_study(svc.tmp / f"{study_id}.yaml", study_id, agent=agent, runs=n, queue=queue)
    settings = load_settings(database_url=svc.db_url, broker_url=broker.url)
    report = submit_study(path, settings=settings, show_progress=False)
    assert report.published == n, report
    worker = Worker(
        svc,
        app="workers.app",
        queue=queue,
        pool=pool,
        concurrency=concurrency,
        env={"STUDYQ_BROKER_URL": broker.url, "STUDYQ_DATABASE_URL": svc.db_url, **(env or {})},
        name=f"studyq-{agent}-{pool}-{uuid.uuid4().hex[:6]}",
    )
    try:
        ready = worker.wait_ready()
        cpu_start = worker.cpu_s()
        if on_ready is not None:
            on_ready(worker)
        with ResultStore.open(svc.db_url) as store:

            def finished() -> bool:
                counts = store.count_by_status(study_id)
                return counts.get("success", 0) + counts.get("failed", 0) >= n

            _wait_until(finished, timeout=600, what=f"{n} {agent} runs")
            counts = store.count_by_status(study_id)
            if counts.get("success", 0) != n:
                raise RuntimeError(f"studyq {agent}: {counts} (want {n} success)")
            with store.engine.connect() as connection:
                last = connection.execute(
                    text("SELECT max(ended_at) FROM runs WHERE study_id = :s"), {"s": study_id}
                ).scalar_one()
            cpu_end = worker.cpu_s()
            pg_cpu = _pg_backend_cpu_s(svc)
    finally:
        worker.stop()
        broker.drop(queue)
    seconds = last.timestamp() - ready
    _delete_study(svc, study_id)
    return {
        "rate": n / seconds,
        "seconds": seconds,
        **_cpu_per_task(cpu_start, cpu_end, n),
        "pg_cpu_ms": pg_cpu / n * 1e3,
    }


def measure_raw_drain(
    svc: Services,
    broker: Broker,
    *,
    task: str,
    n: int,
    pool: str,
    concurrency: int,
    prefetch: int,
    acks_late: bool,
    events: bool = False,
    queue_type: str = "quorum",
) -> dict[str, float]:
    """Pre-enqueue ``n`` raw tasks, start a worker, time ready -> last completion recorded
    (in Redis, whichever broker carries the tasks)."""
    os.environ["BENCH_QUEUE_TYPE"] = queue_type
    from _raw_app import create_app

    queue = broker.queue(f"raw-{task}")
    key = svc.key(f"raw-{task}")
    client = svc.redis()
    app = create_app(broker.url)
    try:
        with app.producer_or_acquire() as producer:
            for i in range(n):
                args: list[Any] = [key]
                if task == "sleep":
                    args.append(SLEEP_S)
                elif task == "upsert":
                    args.append(i)
                app.send_task(f"bench.{task}", args=args, queue=queue, producer=producer)
    finally:
        app.close()
    broker.wait_length(queue, n, f"raw {task} set-up")
    env = {
        "BENCH_BROKER": broker.url,
        "BENCH_RECORD": svc.broker,
        "BENCH_QUEUE_TYPE": queue_type,
        "BENCH_PREFETCH": str(prefetch),
        "BENCH_ACKS_LATE": "1" if acks_late else "0",
        "BENCH_PG": svc.db_url,
        "BENCH_EVENTS": "1" if events else "0",
    }
    worker = Worker(
        svc,
        app="_raw_app",
        queue=queue,
        pool=pool,
        concurrency=concurrency,
        env=env,
        name=f"raw-{task}-{pool}-{uuid.uuid4().hex[:6]}",
    )
    try:
        ready = worker.wait_ready()
        cpu_start = worker.cpu_s()
        _wait_until(
            lambda: int(client.get(f"{key}:done") or 0) >= n,
            timeout=600,
            what=f"{n} raw {task} tasks",
        )
        last = float(client.get(f"{key}:last") or 0)
        cpu_end = worker.cpu_s()
        pg_cpu = _pg_backend_cpu_s(svc)
    finally:
        worker.stop()
        broker.drop(queue)
        svc.drop_keys(f"{key}:done", f"{key}:first", f"{key}:last")
    seconds = last - ready
    return {
        "rate": n / seconds,
        "seconds": seconds,
        **_cpu_per_task(cpu_start, cpu_end, n),
        "pg_cpu_ms": pg_cpu / n * 1e3,
    }


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Series:
    """One measured quantity across repeats."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def span(self, fmt: str) -> str:
        return f"{format(min(self.values), fmt)}\u2013{format(max(self.values), fmt)}"


@dataclass(frozen=True)
class Step:
    """One measurement of a repeat: ``key`` names its series, ``measure`` returns its dict."""

    key: str
    label: str
    measure: Callable[[], dict[str, float]]


def _split(s: dict[str, Series], kind: str) -> dict[str, Series]:
    """The series of one broker (keys ``<broker>:<part>.<step>.<quantity>``), unprefixed."""
    prefix = f"{kind}:"
    return {k[len(prefix) :]: v for k, v in s.items() if k.startswith(prefix)}


def rerender(path: str) -> int:
    """Print the tables of a run saved with ``--save``."""
    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    brokers = tuple(saved.get("brokers", ["redis"]))
    series = {k: Series(list(v)) for k, v in saved["series"].items()}
    if "brokers" not in saved:  # saved before --broker: Redis only, keys unprefixed
        series = {f"redis:{k}": v for k, v in series.items()}
    sizes = Sizes(**saved["sizes"]) if "sizes" in saved else QUICK if saved["quick"] else Sizes()
    print(full_report(series, sizes, saved["repeats"], set(saved["only"]), brokers))
    return 0


def parse_sizes(text: str) -> Sizes:
    """``PUBLISH,NOOP,SLEEP`` (even numbers; the study has two conditions)."""
    try:
        publish, noop, sleep = (int(part.replace("_", "")) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("want PUBLISH,NOOP,SLEEP, e.g. 30000,4000,2000") from None
    if any(n <= 0 or n % 2 for n in (publish, noop, sleep)):
        raise argparse.ArgumentTypeError("sizes must be positive even numbers")
    return Sizes(publish, noop, sleep)


def run(args: argparse.Namespace) -> int:
    sizes = args.sizes or (QUICK if args.quick else Sizes())
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    only = set(args.only or ["a", "b", "c"])
    kinds = BROKERS if args.broker == "both" else (args.broker,)
    queue_type = args.raw_queue_type
    s: dict[str, Series] = {}

    def add(name: str, value: float) -> None:
        s.setdefault(name, Series()).add(value)

    def log(text: str) -> None:
        print(f"# {text}", file=sys.stderr, flush=True)

    began = time.monotonic()
    with services(args.redis_db, args.keep, kinds, args.amqp_url) as svc:
        where = args.amqp_url.rpartition("@")[2]
        log(
            f"brokers {', '.join(kinds)} (redis db {args.redis_db}, amqp {where}), "
            f"postgres {svc.db_name}, tmp {svc.tmp}, {sizes}, repeats {repeats}"
        )

        def steps_of(broker: Broker) -> dict[str, list[Step]]:
            def studyq(
                agent: str, n: int, pool: str, c: int, env: dict[str, str] | None = None
            ) -> Callable[[], dict[str, float]]:
                return lambda: measure_studyq_drain(
                    svc, broker, agent=agent, n=n, pool=pool, concurrency=c, env=env
                )

            def raw(
                task: str,
                n: int,
                pool: str,
                c: int,
                prefetch: int,
                acks_late: bool,
                events: bool = False,
            ) -> Callable[[], dict[str, float]]:
                return lambda: measure_raw_drain(
                    svc,
                    broker,
                    task=task,
                    n=n,
                    pool=pool,
                    concurrency=c,
                    prefetch=prefetch,
                    acks_late=acks_late,
                    events=events,
                    queue_type=queue_type,
                )

            parts: dict[str, list[Step]] = {
                "a": [
                    Step(
                        "a.loop",
                        "apply_async loop",
                        lambda: measure_publish_loop(svc, broker, sizes.publish, queue_type),
                    ),
                    Step(
                        "a.studyq",
                        "studyq submit",
                        lambda: measure_publish_studyq(
                            svc, broker, sizes.publish, sent_events=args.sent_events
                        ),
                    ),
                ],
                "b": [
                    Step(
                        "b.raw_same",
                        "raw no-op (acks_late, prefetch 1)",
                        raw("noop", sizes.noop, "prefork", PREFORK, 1, True),
                    ),
                    Step("b.studyq", "studyq noop", studyq("noop", sizes.noop, "prefork", PREFORK)),
                    Step(  # the peer of issue 14's (b) goal
                        "b.floor",
                        "raw + PG upsert (acks_late, prefetch 1)",
                        raw("upsert", sizes.noop, "prefork", PREFORK, 1, True),
                    ),
                ],
                "c": [
                    Step(
                        "c.raw",
                        "raw 20 ms sleep",
                        raw("sleep", sizes.sleep, "threads", THREADS, 1, True),
                    ),
                    Step(
                        "c.studyq", "studyq sleep", studyq("sleep", sizes.sleep, "threads", THREADS)
                    ),
                ],
            }
            if args.extras:  # the diagnostics of earlier sessions (docs/benchmarks.md)
                parts["b"] += [
                    Step(
                        "b.at_most_once",
                        "studyq noop, durable claims (STUDYQ_AT_MOST_ONCE)",
                        studyq(
                            "noop", sizes.noop, "prefork", PREFORK, {"STUDYQ_AT_MOST_ONCE": "true"}
                        ),
                    ),
                    Step(
                        "b.raw_default",
                        "raw no-op (prefetch 4, acks_late off)",
                        raw("noop", sizes.noop, "prefork", PREFORK, 4, False),
                    ),
                    Step(
                        "b.raw_events",
                        "raw no-op + task events (acks_late, prefetch 1)",
                        raw("noop", sizes.noop, "prefork", PREFORK, 1, True, events=True),
                    ),
                ]
                parts["c"].append(
                    Step(
                        "c.raw_events",
                        "raw 20 ms sleep + task events",
                        raw("sleep", sizes.sleep, "threads", THREADS, 1, True, events=True),
                    )
                )
            return parts

        plan = {kind: steps_of(broker) for kind, broker in svc.brokers.items()}
        for rep in range(repeats):
            for part in ("a", "b", "c"):
                if part not in only:
                    continue
                # Both brokers back to back in each part, so they see the same machine; who
                # goes first (broker, and side within a broker) alternates between repeats.
                for kind in reversed(kinds) if rep % 2 else kinds:
                    steps = plan[kind][part]
                    for step in reversed(steps) if rep % 2 else steps:
                        out = step.measure()
                        for name, value in out.items():
                            add(f"{kind}:{step.key}.{name}", value)
                        shown = ", ".join(f"{k} {v:,.2f}" for k, v in out.items())
                        log(f"[{rep}] ({part}) {LABELS[kind]}: {step.label}: {shown}")
            for kind in kinds:
                add_ratios(s, kind, only)
            log(f"repeat {rep} done after {time.monotonic() - began:,.0f} s")

    if args.save:
        Path(args.save).write_text(
            json.dumps({"quick": args.quick, "repeats": repeats, "only": sorted(only),
                        "brokers": list(kinds), "sizes": asdict(sizes),
                        "raw_queue_type": queue_type,
                        "series": {k: v.values for k, v in s.items()}}, indent=1),
            encoding="utf-8",
        )  # fmt: skip
    print(full_report(s, sizes, repeats, only, kinds, queue_type))
    print(f"\n(measured in {time.monotonic() - began:,.0f} s)")
    missed = [
        f"{LABELS[kind]} {goal}" for kind in kinds for goal in goals_missed(_split(s, kind), only)
    ]
    if missed:
        print(f"\ngoals missed: {', '.join(missed)}", file=sys.stderr)
    return 1 if (args.check and missed) else 0


def add_ratios(s: dict[str, Series], kind: str, only: set[str]) -> None:
    """The ratios of the latest repeat of broker ``kind``, each against its own baseline."""

    def last(name: str) -> float:
        return s[f"{kind}:{name}"].values[-1]

    def add(name: str, num: str, den: str) -> None:
        if f"{kind}:{num}" in s and f"{kind}:{den}" in s:
            s.setdefault(f"{kind}:{name}", Series()).add(last(num) / last(den))

    if "a" in only:
        add("a.ratio.publish", "a.studyq.publish_rate", "a.loop.rate")
        add("a.ratio.total", "a.studyq.total_rate", "a.loop.rate")
        add("a.ratio.quiet", "a.studyq.quiet_rate", "a.loop.rate")
    if "b" in only:
        for base in ("raw_same", "raw_default", "floor", "raw_events"):
            add(f"b.ratio.{base}", "b.studyq.rate", f"b.{base}.rate")
        add("b.ratio.at_most_once", "b.at_most_once.rate", "b.studyq.rate")
    if "c" in only:
        add("c.ratio", "c.studyq.rate", "c.raw.rate")
        add("c.ratio_events", "c.studyq.rate", "c.raw_events.rate")


def goals_missed(s: dict[str, Series], only: set[str]) -> list[str]:
    missed = []
    if "a" in only and s["a.ratio.publish"].median < PUBLISH_GOAL:
        missed.append("(a) publish")
    if "a" in only and s["a.ratio.total"].median < SUBMIT_GOAL:
        missed.append("(a) whole submit")
    if "b" in only and s["b.ratio.floor"].median < NOOP_GOAL:
        missed.append("(b) no-op")
    if "c" in only and s["c.ratio"].median < SLEEP_GOAL:
        missed.append("(c) 20 ms sleep")
    return missed


X = "\u00d7"  # multiplication sign, for the markdown tables
TO = "\u2013"  # en dash, for ranges
GE = "\u2265"  # greater-than or equal to


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def report(s: dict[str, Series], sizes: Sizes, only: set[str], label: str = "Redis") -> str:
    """The markdown tables of one broker's figures (``s`` unprefixed: :func:`_split`)."""

    def opt(key: str, make: Callable[[], str]) -> list[str]:
        """A row of a step measured only with ``--extras``: none when it was not."""
        return [make()] if f"{key}.rate" in s else []

    def med(name: str, fmt: str) -> str:
        return format(s[name].median, fmt)

    def rate(name: str) -> str:
        return f"{med(name, ',.0f')} /s"

    def span(name: str, fmt: str = ",.0f") -> str:
        return s[name].span(fmt)

    def secs(name: str) -> str:
        return f"{med(name, '.2f')} [{span(name, '.2f')}]"

    def cpu(key: str) -> str:
        """Worker CPU per task: total (main process + pool children)."""
        total, main, child = (s[f"{key}.{k}_cpu_ms"].median for k in ("worker", "main", "child"))
        return f"{total:.2f} ({main:.2f} + {child:.2f})" if child > 0.005 else f"{total:.2f}"

    def ratio(name: str, goal: float | None = None, pct: bool = False) -> str:
        fmt = ".0%" if pct else ".1f"
        text = f"{med(name, fmt)}{'' if pct else X} [{span(name, fmt)}]"
        if goal is not None:
            verdict = "met" if s[name].median >= goal else "**missed**"
            text += f" (goal {GE} {format(goal, '.0%' if pct else '.0f')}"
            text += f"{'' if pct else X}: {verdict})"
        return text

    lines: list[str] = []
    if "a" in only:
        n = sizes.publish
        loop_s = f"{n / s['a.loop.rate'].median:.2f}"
        lines += [
            f"**(a) {label}: publishing {n:,} runs** to one queue (no consumer attached)",
            "",
            _row("what", "rate", f"min{TO}max", f"seconds [min{TO}max]", "vs `apply_async` loop"),
            _row(*["---"] * 5),
            _row(
                "baseline: plain `apply_async` loop of a trivial task",
                rate("a.loop.rate"), span("a.loop.rate"), loop_s, f"1.0{X}",
            ),
            _row(
                "**`studyq submit`, publish part**: mark queued + publish "
                "(run message per run; `task-sent` events only with `--sent-events`)",
                rate("a.studyq.publish_rate"), span("a.studyq.publish_rate"),
                secs("a.studyq.publish_s"), ratio("a.ratio.publish", PUBLISH_GOAL),
            ),
            _row(
                "\u21b3 of which waiting for PostgreSQL (the next page is marked queued on "
                "a second thread while one is published)",
                "", "", secs("a.studyq.db_s"), "",
            ),
            _row(
                "\u21b3 of which `CeleryTransport.publish` (build and push messages, batch "
                "events; RabbitMQ: wait for the publisher confirms)",
                "", "", secs("a.studyq.broker_s"), "",
            ),
            _row(
                f"`studyq submit`, register {n:,} runs (before publishing; `COPY` on "
                "PostgreSQL)",
                "", "", secs("a.studyq.register_s"), "",
            ),
            _row("`studyq submit`, prepare (load, design, plan)", "", "",
                 secs("a.studyq.prepare_s"), ""),
            _row(
                "`studyq submit` total: prepare + register + publish",
                rate("a.studyq.total_rate"), span("a.studyq.total_rate"),
                secs("a.studyq.total_s"), ratio("a.ratio.total", SUBMIT_GOAL),
            ),
            _row(
                "for reference: `CeleryTransport.publish` of the same runs, `sent_events=False` "
                "(the broker side alone, no store pages)",
                rate("a.studyq.quiet_rate"), span("a.studyq.quiet_rate"),
                secs("a.studyq.quiet_s"), ratio("a.ratio.quiet"),
            ),
            "",
        ]  # fmt: skip
    if "b" in only:
        n = sizes.noop
        lines += [
            f"**(b) {label}: {n:,} no-op runs end to end**: one worker `-P prefork -c {PREFORK}`, "
            "runs pre-enqueued, clock from `worker_ready` to the last run recorded",
            "",
            _row(
                "what", "rate", f"min{TO}max", "studyq's rate as % of this",
                "worker CPU ms/task: total (main + children)", "PG backend CPU ms/task",
            ),
            _row(*["---"] * 6),
            _row(
                "**studyq** (`noop` agent: claim + execute + result write per run)",
                rate("b.studyq.rate"), span("b.studyq.rate"), "", cpu("b.studyq"),
                med("b.studyq.pg_cpu_ms", ".2f"),
            ),
            *opt("b.at_most_once", lambda: _row(
                "studyq with durable claims (`STUDYQ_AT_MOST_ONCE` / `execution.at_most_once`: "
                "one WAL flush per claim); its rate as % of studyq's default",
                rate("b.at_most_once.rate"), span("b.at_most_once.rate"),
                ratio("b.ratio.at_most_once", pct=True), cpu("b.at_most_once"),
                med("b.at_most_once.pg_cpu_ms", ".2f"),
            )),
            _row(
                "raw Celery no-op, studyq's delivery settings (acks_late, prefetch 1)",
                rate("b.raw_same.rate"), span("b.raw_same.rate"),
                ratio("b.ratio.raw_same", pct=True), cpu("b.raw_same"), "",
            ),
            *opt("b.raw_default", lambda: _row(
                "raw Celery no-op, Celery's defaults (prefetch 4, acks_late off)",
                rate("b.raw_default.rate"), span("b.raw_default.rate"),
                ratio("b.ratio.raw_default", pct=True), cpu("b.raw_default"), "",
            )),
            *opt("b.floor", lambda: _row(
                "raw Celery + one PostgreSQL UPSERT per task in its own transaction "
                "(ANCHORS stack floor; acks_late, prefetch 1)",
                rate("b.floor.rate"), span("b.floor.rate"),
                ratio("b.ratio.floor", NOOP_GOAL, pct=True),
                cpu("b.floor"), med("b.floor.pg_cpu_ms", ".2f"),
            )),
            *opt("b.raw_events", lambda: _row(
                "diagnostic: raw Celery no-op with task events on, flushed as Celery does "
                "(studyq's workers batch theirs; acks_late, prefetch 1)",
                rate("b.raw_events.rate"), span("b.raw_events.rate"),
                ratio("b.ratio.raw_events", pct=True), cpu("b.raw_events"), "",
            )),
            "",
        ]  # fmt: skip
    if "c" in only:
        n = sizes.sleep
        ideal = n * SLEEP_S / THREADS

        def times_ideal(name: str) -> str:
            return f"{s[name].median / ideal:.2f}{X}"

        lines += [
            f"**(c) {label}: {n:,} runs sleeping 20 ms**: one worker `-P threads -c {THREADS}`, "
            f"runs pre-enqueued, `worker_ready` to the last run recorded; ideal {n:,} {X} 0.02 s / "
            f"{THREADS} = {ideal:.2f} s",
            "",
            _row(
                "what", f"seconds [min{TO}max]", f"{X} ideal", "rate",
                "studyq's rate as % of this", "worker CPU ms/task",
            ),
            _row(*["---"] * 6),
            _row(
                "**studyq** (`sleep` agent, `sleep_s: 0.02`)", secs("c.studyq.seconds"),
                times_ideal("c.studyq.seconds"), rate("c.studyq.rate"), "", cpu("c.studyq"),
            ),
            _row(
                "raw Celery 20 ms sleep task (acks_late, prefetch 1)", secs("c.raw.seconds"),
                times_ideal("c.raw.seconds"), rate("c.raw.rate"),
                ratio("c.ratio", SLEEP_GOAL, pct=True), cpu("c.raw"),
            ),
            *opt("c.raw_events", lambda: _row(
                "diagnostic: raw Celery 20 ms sleep with task events on",
                secs("c.raw_events.seconds"), times_ideal("c.raw_events.seconds"),
                rate("c.raw_events.rate"), ratio("c.ratio_events", pct=True),
                cpu("c.raw_events"),
            )),
            _row(
                "ideal", f"{ideal:.2f}", f"1.00{X}", f"{n / ideal:,.0f} /s",
                f"{ideal / s['c.studyq.seconds'].median:.0%}", "",
            ),
            "",
        ]  # fmt: skip
    return "\n".join(lines)


def side_by_side(s: dict[str, Series], sizes: Sizes, only: set[str], kinds: tuple[str, ...]) -> str:
    """One table, a column per broker: the rates, and each broker's ratios against its own
    raw Celery baseline; with two brokers, a last column RabbitMQ / Redis (medians)."""
    per = {kind: _split(s, kind) for kind in kinds}
    both = len(kinds) == 2

    def cell(kind: str, name: str, fmt: str, goal: float | None = None) -> str:
        series = per[kind].get(name)
        if series is None:
            return ""
        pct = fmt == "%"
        shown = f"{series.median:.0%}" if pct else f"{series.median:{fmt}}"
        text = f"{shown} [{series.span('.0%' if pct else fmt)}]"
        if goal is not None:
            text += " (met)" if series.median >= goal else " (**missed**)"
        return text

    def cross(name: str) -> str:
        a, b = (per[kind].get(name) for kind in kinds)
        return f"{b.median / a.median:.2f}" if a and b else ""

    rows: list[tuple[str, str, str, float | None, bool]] = []  # label, key, fmt, goal, cross
    if "a" in only:
        rows += [
            (f"(a) raw Celery: `apply_async` loop, {sizes.publish:,} tasks/s", "a.loop.rate",
             ",.0f", None, True),
            ("(a) studyq submit, publish part, runs/s", "a.studyq.publish_rate", ",.0f", None,
             True),
            ("(a) studyq submit, whole (prepare + register + publish), runs/s",
             "a.studyq.total_rate", ",.0f", None, True),
            (f"(a) publish part {X} own `apply_async` loop (goal {GE} {PUBLISH_GOAL:.0f}{X})",
             "a.ratio.publish", ".1f", PUBLISH_GOAL, False),
            (f"(a) whole submit {X} own `apply_async` loop (goal {GE} {SUBMIT_GOAL:.0f}{X})",
             "a.ratio.total", ".1f", SUBMIT_GOAL, False),
            ("(a) publisher CPU \u00b5s/run inside `CeleryTransport.publish` (events as submitted)",
             "a.studyq.publish_cpu_us", ",.0f", None, True),
            ("(a) `sent_events=False` publish, runs/s", "a.studyq.quiet_rate", ",.0f", None,
             True),
            ("(a) \u21b3 publisher process CPU \u00b5s/run", "a.studyq.quiet_cpu_us", ",.0f",
             None, True),
            ("(a) \u21b3 broker server CPU \u00b5s/run (redis-server / beam.smp; shared)",
             "a.studyq.quiet_server_cpu_us", ",.0f", None, True),
        ]  # fmt: skip
    if "b" in only:
        rows += [
            (f"(b) raw Celery no-op, prefork -c {PREFORK} (acks_late, prefetch 1), tasks/s",
             "b.raw_same.rate", ",.0f", None, True),
            (f"(b) studyq no-op runs, {sizes.noop:,}, runs/s", "b.studyq.rate", ",.0f", None,
             True),
            ("(b) studyq as % of own raw Celery", "b.ratio.raw_same", "%", None, False),
            ("(b) raw Celery + one PostgreSQL UPSERT per task, tasks/s", "b.floor.rate",
             ",.0f", None, True),
            (f"(b) studyq as % of raw Celery + one UPSERT (goal {GE} {NOOP_GOAL:.0%})",
             "b.ratio.floor", "%", NOOP_GOAL, False),
            ("(b) worker CPU ms/task, studyq", "b.studyq.worker_cpu_ms", ".2f", None, True),
            ("(b) worker CPU ms/task, raw Celery", "b.raw_same.worker_cpu_ms", ".2f", None,
             True),
        ]  # fmt: skip
    if "c" in only:
        rows += [
            (
                f"(c) raw Celery 20 ms sleep, threads -c {THREADS}, tasks/s",
                "c.raw.rate",
                ",.0f",
                None,
                True,
            ),
            (
                f"(c) studyq 20 ms runs, {sizes.sleep:,}, runs/s",
                "c.studyq.rate",
                ",.0f",
                None,
                True,
            ),
            (
                f"(c) studyq as % of own raw Celery (goal {GE} {SLEEP_GOAL:.0%})",
                "c.ratio",
                "%",
                SLEEP_GOAL,
                False,
            ),
            ("(c) worker CPU ms/task, studyq", "c.studyq.worker_cpu_ms", ".2f", None, True),
            ("(c) worker CPU ms/task, raw Celery", "c.raw.worker_cpu_ms", ".2f", None, True),
        ]
    header = ["what", *(f"{LABELS[kind]} [min{TO}max]" for kind in kinds)]
    if both:
        header.append(f"{LABELS[kinds[1]]} / {LABELS[kinds[0]]}")
    lines = [_row(*header), _row(*["---"] * len(header))]
    for label, key, fmt, goal, crossed in rows:
        if not any(key in per[kind] for kind in kinds):
            continue  # not measured in this run (e.g. a run saved before the row existed)
        cells = [cell(kind, key, fmt, goal) for kind in kinds]
        if both:
            cells.append(cross(key) if crossed else "")
        lines.append(_row(label, *cells))
    return "\n".join(lines)


def full_report(
    s: dict[str, Series],
    sizes: Sizes,
    repeats: int,
    only: set[str],
    kinds: tuple[str, ...],
    queue_type: str = "quorum",
) -> str:
    """The side-by-side table, then each broker's detailed tables."""
    lines = [
        f"Medians of {repeats} repeat(s) with [min{TO}max]; a ratio is the median of the "
        "per-repeat ratios, each broker against raw Celery on the same broker (both sides "
        "measured back to back in the same repeat, the order alternating between repeats; "
        "the brokers back to back in each part).",
        "",
    ]
    if "rabbitmq" in kinds:
        lines += [
            f"RabbitMQ: studyq's run queues are quorum queues; raw Celery's are {queue_type} "
            "queues (`task_create_missing_queue_type`); studyq publishes with publisher "
            "confirms, raw Celery's `apply_async` without.",
            "",
        ]
    lines += [side_by_side(s, sizes, only, kinds), ""]
    for kind in kinds:
        lines += [report(_split(s, kind), sizes, only, LABELS[kind]).rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def phase_breakdown(svc: Services, n: int) -> str:
    """Where one process's time per run goes: ``run_delivery`` called serially in this
    process on ``n`` queued ``noop`` runs (no Celery; results written before each delivery
    returns), with the store's ``claim_runs`` and ``finish_runs_batch`` and ``execute_run``
    wrapped to take wall and CPU time and count SQL
    statements. The first 20 runs warm up (connections, study context, imports)."""
    import collections

    from sqlalchemy import event

    import workers.runtask as runtask
    from orchestrator.contracts.settings import load_settings
    from orchestrator.distributed import submit_study
    from orchestrator.store import ResultStore
    from workers.config import WorkerSettings
    from workers.runtime import WorkerRuntime

    queue = svc.queue("phases")
    study_id = f"bench-phases-{uuid.uuid4().hex[:8]}"
    path = write_study(svc.tmp / f"{study_id}.yaml", study_id, agent="noop", runs=n, queue=queue)
    submit_study(
        path,
        settings=load_settings(database_url=svc.db_url, broker_url=svc.broker),
        show_progress=False,
    )
    svc.drop_keys(queue)  # the messages are not needed: run_delivery gets them directly
    with ResultStore.open(svc.db_url) as store:
        messages = [run.spec.to_message() for run in store.iter_runs(study_id)]
    runtime = WorkerRuntime(
        WorkerSettings(database_url=svc.db_url, broker_url=svc.broker),
        worker=f"bench-phases@{os.uname().nodename}:{os.getpid()}",
    )
    phase = ["other"]
    statements: collections.Counter[str] = collections.Counter()
    wall: dict[str, float] = collections.defaultdict(float)
    cpu: dict[str, float] = collections.defaultdict(float)
    event.listen(
        runtime.store.engine,
        "before_cursor_execute",
        lambda *_, **__: statements.update([phase[0]]),
    )
    # Claims and results bypass SQLAlchemy (a driver cursor in autocommit): count them there.
    from orchestrator.store import attempts

    original_executor = attempts.cursor_executor

    def counting_executor(cursor: Any) -> Any:
        execute = original_executor(cursor)

        def counted(sql: str, params: Any) -> Any:
            statements.update([phase[0]])
            return execute(sql, params)

        return counted

    attempts.cursor_executor = counting_executor  # type: ignore[assignment]

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            previous, phase[0] = phase[0], name
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall[name] += time.perf_counter() - w
                cpu[name] += time.process_time() - c
                phase[0] = previous

        return wrapper

    original_execute = getattr(runtask, "execute_run")  # noqa: B009 (not in its __all__)
    store = runtime.store
    store.claim_runs = timed("claim", store.claim_runs)  # type: ignore[method-assign]
    store.finish_runs_batch = timed("finish", store.finish_runs_batch)  # type: ignore[method-assign]
    setattr(runtask, "execute_run", timed("execute", original_execute))  # noqa: B010
    try:
        for message in messages[:20]:
            runtask.run_delivery(runtime, message, 0)
        wall.clear()
        cpu.clear()
        statements.clear()
        w0, c0 = time.perf_counter(), time.process_time()
        for message in messages[20:]:
            runtask.run_delivery(runtime, message, 0)
        total_wall, total_cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        setattr(runtask, "execute_run", original_execute)  # noqa: B010
        attempts.cursor_executor = original_executor  # type: ignore[assignment]
        runtime.close()
    count = len(messages) - 20
    wall["other"] = total_wall - sum(wall[k] for k in ("claim", "execute", "finish"))
    cpu["other"] = total_cpu - sum(cpu[k] for k in ("claim", "execute", "finish"))
    lines = [
        f"`run_delivery` serially in one process, {count:,} no-op runs, PostgreSQL store "
        f"(no Celery): {total_wall / count * 1e3:.2f} ms/run wall, "
        f"{total_cpu / count * 1e3:.2f} ms/run CPU ({count / total_wall:,.0f} runs/s)",
        "",
        "| phase | wall ms/run | CPU ms/run | wall minus CPU (waiting) | SQL statements/run |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "claim": "claim (`claim_runs`: one statement, asynchronous commit)",
        "execute": "execute (`execute_run`: resolve, seed, call agent, score)",
        "finish": "finish (`finish_runs_batch`: one statement, durable commit)",
        "other": "other (parse, study context, supervisor + lease keeper, interrupt, counters)",
    }
    for key, label in labels.items():
        lines.append(
            f"| {label} | {wall[key] / count * 1e3:.2f} | {cpu[key] / count * 1e3:.2f} | "
            f"{(wall[key] - cpu[key]) / count * 1e3:.2f} | {statements[key] / count:.1f} |"
        )
    _delete_study(svc, study_id)
    return "\n".join(lines)


def profile(args: argparse.Namespace) -> int:
    """Where studyq's time per run goes. Prints :func:`phase_breakdown`, then runs (b)'s (or
    with ``--only c``, (c)'s) studyq side once with ``py-spy record`` (CPU samples, subprocesses
    and threads) on the worker's main process and its pool children, writing
    ``<dir>/<role>.txt`` (collapsed stacks). py-spy slows the worker; the stacks say where
    CPU goes, not the rate."""
    out_dir = Path(args.profile).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    sizes = QUICK if args.quick else Sizes()
    part = "c" if args.only == ["c"] else "b"
    recorders: list[subprocess.Popen[bytes]] = []

    def attach(worker: Worker) -> None:
        deadline = time.monotonic() + 10
        while part == "b" and len(worker.children()) < PREFORK and time.monotonic() < deadline:
            time.sleep(0.05)
        targets = {"main": worker.process.pid}
        targets.update({f"child{i}": pid for i, pid in enumerate(worker.children())})
        idle = ["--idle"] if args.idle else ["--gil"] if args.gil else []
        for role, pid in targets.items():
            recorders.append(
                subprocess.Popen(
                    [
                        str(spy),
                        "record",
                        "--pid",
                        str(pid),
                        *idle,
                        "--threads",
                        "--rate",
                        "100",
                        "--format",
                        "raw",
                        "-o",
                        str(out_dir / f"{role}.txt"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    with services(args.redis_db, args.keep) as svc:
        print(phase_breakdown(svc, 1_000 if args.quick else 2_000), flush=True)
        if not spy.exists():
            print("\n(py-spy is not installed: .venv/bin/pip install py-spy; no stacks recorded)")
            return 0
        if part == "b":
            out = measure_studyq_drain(
                svc,
                svc.brokers["redis"],
                agent="noop",
                n=sizes.noop,
                pool="prefork",
                concurrency=PREFORK,
                on_ready=attach,
            )
        else:
            out = measure_studyq_drain(
                svc,
                svc.brokers["redis"],
                agent="sleep",
                n=sizes.sleep,
                pool="threads",
                concurrency=THREADS,
                on_ready=attach,
            )
        for recorder in recorders:
            try:
                recorder.wait(30)
            except subprocess.TimeoutExpired:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(10)
    print(
        f"\n({part}) studyq under py-spy: {out['rate']:,.0f} runs/s ({out['seconds']:.2f} s); "
        f"stacks in {out_dir}"
    )
    if args.gil:
        print(gil_shares(out_dir / "main.txt"))
    return 0


GIL_SHARES = (
    ("studyq: writing results (writer thread)", ("ResultWriter",)),
    ("studyq: claims", ("ClaimBatcher",)),
    ("studyq: execute_run", ("execute_run",)),
    ("studyq: the rest of a delivery", ("workers/", "orchestrator/")),
    ("Celery: task events", ("EventDispatcher", "send_event")),
    ("kombu: acknowledging messages", ("QoS.ack", "basic_ack")),
    ("kombu: receiving (BRPOP, QoS.append)", ("_brpop", "on_readable")),
)
"""Categories of a ``--gil`` profile of the worker's main process, first match wins; the
rest is Celery and kombu (task tracing, pool hand-off, timers)."""


def gil_shares(stacks: Path) -> str:
    """Shares of the GIL-holding samples in a py-spy raw profile, by :data:`GIL_SHARES`."""
    counts: dict[str, int] = {}
    total = 0
    for line in stacks.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        label = next(
            (name for name, marks in GIL_SHARES if any(mark in stack for mark in marks)),
            "Celery and kombu: the rest",
        )
        counts[label] = counts.get(label, 0) + int(count)
    lines = ["| share of the time the GIL is held | |", "| --- | --- |"]
    for label, count in sorted(counts.items(), key=lambda item: -item[1]):
        lines.append(f"| {label} | {100 * count / max(total, 1):.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats", type=int, default=None, help="repeats (default 3; 1 with --quick)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smaller sizes: publish {QUICK.publish:,}, no-op {QUICK.noop:,}",
    )
    parser.add_argument(
        "--only", action="append", choices=["a", "b", "c"], help="run only these parts"
    )
    parser.add_argument(
        "--broker",
        choices=["redis", "rabbitmq", "both"],
        default="both",
        help="measure on Redis, on RabbitMQ, or both side by side (default both)",
    )
    parser.add_argument(
        "--amqp-url",
        default=AMQP_URL,
        help=f"RabbitMQ broker URL (default {AMQP_URL}; the vhost must exist)",
    )
    parser.add_argument(
        "--raw-queue-type",
        choices=["quorum", "classic"],
        default="quorum",
        help="RabbitMQ queue type of raw Celery's queues (default quorum, as studyq's)",
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        metavar="PUBLISH,NOOP,SLEEP",
        help=f"run counts of (a), (b), (c) (default {Sizes().publish},{Sizes().noop},"
        f"{Sizes().sleep})",
    )
    parser.add_argument(
        "--extras",
        action="store_true",
        help="also the diagnostics: durable claims, Celery's default delivery settings, the "
        "PG stack floor, raw Celery with task events",
    )
    parser.add_argument(
        "--redis-db", type=int, default=12, help="Redis database number (default 12)"
    )
    parser.add_argument(
        "--sent-events",
        action="store_true",
        help="(a): submit with STUDYQ_TASK_SENT_EVENTS=1 (a task-sent event per run)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the worker logs")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="diagnostic: sys.setswitchinterval() in every worker (both sides)",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="instead: where studyq's time per run goes (phase table), and "
        "(b)'s studyq side under py-spy, stacks to DIR (--only c: (c)'s)",
    )
    parser.add_argument("--save", metavar="FILE", help="also write the measurements as JSON")
    parser.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="print the tables of a run saved with --save, measure nothing",
    )
    parser.add_argument("--idle", action="store_true", help="with --profile: wall-clock stacks")
    parser.add_argument(
        "--gil", action="store_true", help="with --profile: only the thread holding the GIL"
    )
    args = parser.parse_args(argv)
    os.chdir(REPO_ROOT)
    sys.path[:0] = [str(REPO_ROOT), str(BENCH_DIR)]
    if args.switch_interval is not None:
        os.environ["BENCH_SWITCH_INTERVAL"] = str(args.switch_interval)
    if args.from_file:
        return rerender(args.from_file)
    return profile(args) if args.profile else run(args)


if __name__ == "__main__":
    sys.exit(main())
