"""The distributed path through a real PgBouncer in transaction mode (tests/pgbouncer.py), as
deploy/ ships it: ``studyq submit`` and ``wait`` (the coordinator), real ``celery worker``
processes, a ``kill -9`` mid-run, and 64 worker processes against a PostgreSQL that takes at
most 100 connections. Every sweep ends with the fault suite's audit (tests/faults/
fault_audit.py, through its ``Bed``): no lost run, no duplicate row, attempts within
``max_attempts``, artifacts equal to the fault-free run's.

Workers and coordinator reach the database through PgBouncer only; the test's own view of
the store (the audit, the kill helpers) connects directly. The broker is Redis: the database
path is what is under test here, and the broker tests run on both transports elsewhere.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _services import Broker, ServiceSupplier
from pgbouncer import PgBouncer, pgbouncer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "faults"))

from fault_agents import CALLS_DIR_ENV
from fault_bed import Bed
from fault_services import Workers
from fault_study import FAULT_SWEEP, Shape, run_reference

from orchestrator.contracts.errors import StoreError
from orchestrator.store import ResultStore, create_engine_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.redis_only("the database path is under test, not the broker"),
]

WIDE_SWEEP = Shape(arms=4, replicates=160, sleep_s=0.05)
"""640 runs of 50 ms: ten runs per worker process of the 64."""

SIXTY_FOUR = [("prefork", 10)] * 6 + [("threads", 8)] * 4
"""64 worker processes, each executing runs with a store of its own: 6 prefork workers of 10
pool children (60 processes; their main processes execute nothing) and 4 threads workers
(4 processes of 8 threads)."""

DIRECT_APP = "studyq-test-direct"
"""``application_name`` of the test's own direct connections, left out of the counts."""

CONNECTION_ERRORS = (
    "too many clients",
    "remaining connection slots",
    "no more connections allowed",
    "connection refused",
    "prepared statement",
)


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    with pgbouncer() as server:
        yield server


@pytest.fixture
def through_bouncer(
    services: ServiceSupplier,
    bouncer: PgBouncer,
    live_broker: Broker,
    tmp_path: Path,
) -> Iterator[Callable[[Shape], Bed]]:
    """``make(shape)``: a fault-suite :class:`Bed` whose workers and coordinator use a fresh
    migrated database through ``bouncer``; the reference is the embedded run of the same
    study in another database (directly)."""
    stack: list[Bed] = []
    contexts = []

    def make(shape: Shape) -> Bed:
        tag = uuid.uuid4().hex[:8]
        reference_db = services.pg_database(f"pgb_ref_{tag}", migrate=True)
        contexts.append(reference_db)
        reference = run_reference(shape, tmp_path / "reference", reference_db.__enter__())
        sweep_db = services.pg_database(f"pgb_{tag}", migrate=True)
        contexts.append(sweep_db)
        direct_url = sweep_db.__enter__()
        url = bouncer.url_for(direct_url)
        queue = f"studyq-pgb-{tag}"
        calls_dir = tmp_path / "calls"
        calls_dir.mkdir(exist_ok=True)
        bed = Bed(
            shape=shape,
            database_url=url,
            broker=live_broker,
            queue=queue,
            tmp=tmp_path,
            workers=Workers(
                queue=queue,
                database_url=url,
                broker_url=live_broker.url,
                log_dir=tmp_path,
                env={CALLS_DIR_ENV: str(calls_dir)},
            ),
            store=ResultStore.open(direct_url, connect_args={"application_name": DIRECT_APP}),
            reference=reference,
            calls_dir=calls_dir,
        )
        stack.append(bed)
        return bed

    yield make
    for bed in stack:
        bed.close()
        live_broker.forget(bed.queue)
    for context in reversed(contexts):
        context.__exit__(None, None, None)


def _connection_errors(bed: Bed) -> list[str]:
    return [
        line
        for line in bed.workers.log.splitlines()
        if any(marker in line.lower() for marker in CONNECTION_ERRORS)
    ]


def test_prepare_threshold_in_the_url_reaches_psycopg_and_a_bad_value_is_refused() -> None:
    # Given URLs that say how soon psycopg may prepare (none: never, behind a pooler)
    from orchestrator.contracts.errors import StoreURLError
    from orchestrator.store.engine import _prepare_threshold, normalize_url

    def threshold(url: str) -> object:
        return _prepare_threshold(normalize_url(url))

    # Then "none" is psycopg's None, a number is kept, no parameter keeps psycopg's default
    assert threshold("postgresql://u@h/db?prepare_threshold=none") is None
    assert threshold("postgresql://u@h/db?prepare_threshold=0") == 0
    assert threshold("postgresql://u@h/db") is not None
    # and the URL keeps it, so an engine made again from engine.url keeps it too
    engine = create_engine_for("postgresql://u@h/db?prepare_threshold=none")
    assert engine.url.query["prepare_threshold"] == "none"
    engine.dispose()
    # and a value psycopg cannot take is one clear error, with the password masked
    with pytest.raises(StoreURLError, match=r"prepare_threshold='often'.*u:\*\*\*@h") as error:
        create_engine_for("postgresql://u:pw@h/db?prepare_threshold=often")
    assert "pw" not in str(error.value)


@pytest.mark.timeout(60)
def test_psycopg_prepared_statements_break_through_pgbouncer_unless_the_url_says_so(
    services: ServiceSupplier,
) -> None:
    # Given PgBouncer 1.18 in transaction mode with one server connection, so two clients'
    # transactions take turns on it, and a store with two queued runs
    with (
        pgbouncer(default_pool_size=1) as server,
        services.pg_database(f"pgb_prep_{uuid.uuid4().hex[:6]}", migrate=True) as direct,
    ):
        from dist_studies import make_sweep

        setup = ResultStore.open(direct)
        sweep = make_sweep(setup, agents=["noop"], replicates=2)
        setup.close()

        def wrong_turns(url: str, index: int) -> list[str]:
            """Claim and release the run, alternating between two stores; what went wrong."""
            stores = [ResultStore(create_engine_for(url)) for _ in range(2)]
            wrong: list[str] = []
            try:
                for _ in range(8):  # psycopg prepares from the 5th execution on
                    for store in stores:
                        try:
                            claims = store.claim_runs(
                                sweep.study_id, [index], worker="pgb@host:1", lease_s=30
                            )
                            if len(claims) != 1 or not store.release_run(claims[0]):
                                wrong.append(f"claim won {len(claims)} runs or was not released")
                        except StoreError as error:
                            wrong.append(str(error))
            finally:
                for store in stores:
                    store.close()
            return wrong

        plain = server.url_for(direct).split("?", 1)[0]
        # When the worker's statements run through it with psycopg's default, then Then they
        # run into the other client's prepared statements (an error, or the wrong statement)
        assert wrong_turns(plain, sweep.specs[0].index), (
            "psycopg's prepared statements worked through PgBouncer"
        )
        # and with ?prepare_threshold=none every claim and release does what it should
        assert wrong_turns(server.url_for(direct), sweep.specs[1].index) == []


@pytest.mark.timeout(150)
def test_a_sweep_through_pgbouncer_survives_a_pool_child_killed_mid_run(
    through_bouncer: Callable[[Shape], Bed],
) -> None:
    # Given a sweep on two prefork workers, coordinator and workers through PgBouncer
    bed = through_bouncer(FAULT_SWEEP)
    worker, _other = bed.workers.start(2)
    bed.submit()
    coordinator = bed.wait_in_background(timeout_s=120)
    bed.wait_for_successes(10)
    # When a pool child is killed with SIGKILL while it executes a run
    killed = bed.kill_pool_child_mid_run(worker)
    # Then the sweep completes, the killed run came back when its lease expired and succeeded
    # later, no worker logged a connection error, and the audit holds
    coordinator["thread"].join(130)
    assert "error" not in coordinator, coordinator.get("error")
    assert coordinator["report"].complete, (coordinator["report"].counts, bed.workers.tail())
    history = bed.attempts_of(killed)
    assert history[0][2] == "lost" and history[-1][2] == "success", history
    assert not _connection_errors(bed), _connection_errors(bed)[:5]
    bed.audit()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_64_worker_processes_drain_a_study_through_pgbouncer_on_a_100_connection_server(
    through_bouncer: Callable[[Shape], Bed], bouncer: PgBouncer
) -> None:
    # Given PostgreSQL limited to 100 connections (max_connections, as the machine's is), 64
    # worker processes through PgBouncer: directly they would ask it for 2 per prefork child
    # (bench/connections.py)
    bed = through_bouncer(WIDE_SWEEP)
    bed.workers.env.update(STUDYQ_LEASE_S="30", STUDYQ_HEARTBEAT_S="5")  # 2 busy cores
    with bed.store.engine.connect() as connection:
        limit = int(connection.exec_driver_sql("SHOW max_connections").scalar_one())
    assert limit <= 100
    started = [bed.workers.start(1, wait=False, pool=p, concurrency=c)[0] for p, c in SIXTY_FOUR]
    for worker in started:
        worker.wait_ready(timeout=150)
    pools = zip(started, SIXTY_FOUR, strict=True)
    processes = sum(
        len(worker.children()) if pool == "prefork" else 1 for worker, (pool, _) in pools
    )
    assert processes == 64
    # When the study is submitted and waited for, while the server's connections to the
    # sweep's database are counted
    peak = {"server": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with bed.store.engine.connect() as connection:
                count = connection.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    f"AND application_name <> '{DIRECT_APP}'"
                ).scalar_one()
            peak["server"] = max(peak["server"], int(count))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        submitted = bed.submit()
        report = bed.wait(timeout_s=150)
    finally:
        stop.set()
        sampler.join(5)
    clients = sum(1 for row in bouncer.show("CLIENTS") if row.get("database") != "pgbouncer")
    # Then every run succeeded exactly once, no worker logged a connection error, PgBouncer
    # held the server to its pool (20) while serving far more clients, and the audit holds
    assert submitted.published == WIDE_SWEEP.runs
    assert report.complete and report.counts["success"] == WIDE_SWEEP.runs
    assert not _connection_errors(bed), _connection_errors(bed)[:5]
    assert 0 < peak["server"] <= 20, peak
    assert clients >= 64, clients
    audit = bed.audit()
    assert sum(audit.attempts_per_run.values()) >= WIDE_SWEEP.runs
