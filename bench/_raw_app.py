"""The raw Celery baseline of ``bench/distributed.py``: a tiny app with trivial tasks.

Configured as ANCHORS.md section 2 measures raw Celery: JSON serializer, ``task_ignore_result``,
no result backend, no task events. ``BENCH_PREFETCH`` and ``BENCH_ACKS_LATE`` choose the
prefetch multiplier and acks_late (studyq's workers use 1 and on; Celery's defaults are 4 and
off); ``BENCH_EVENTS=1`` turns on task events (``worker_send_task_events``, as studyq's
workers send them for Flower).

Every task (``bench.noop``, ``bench.sleep``, and ``bench.upsert``, the ANCHORS "stack floor"
task that first UPSERTs one row into PostgreSQL ``BENCH_PG``) records its completion with one
pipelined Redis round trip (INCR plus 2 SETs), as in ANCHORS, under the key prefix it is
given:

* ``<key>:done``  -- tasks completed
* ``<key>:first`` -- ``time.time()`` of the first completion (SET NX)
* ``<key>:last``  -- ``time.time()`` of the latest completion

The broker is ``BENCH_BROKER``: the bench's own Redis database or its RabbitMQ vhost. On
RabbitMQ the queues Celery creates are of type ``BENCH_QUEUE_TYPE`` (default ``quorum``, as
studyq's run queues, so the baseline is like for like; ``classic`` for comparison). The
completion records always go to Redis, ``BENCH_RECORD`` (default: ``BENCH_BROKER`` when that
is Redis), through one client per process (created after the prefork fork), so the record
costs the same round trip whichever broker carries the tasks.

Not part of studyq: only the benchmark imports it.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

BROKER = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/12")
RECORD = os.environ.get(
    "BENCH_RECORD", BROKER if BROKER.startswith("redis") else "redis://127.0.0.1:6379/12"
)


def create_app(broker: str) -> Celery:
    """The raw app on ``broker``, configured from the ``BENCH_*`` environment (the bench
    publishes through one of its own per broker; the workers import :data:`app`)."""
    raw = Celery("bench_raw", broker=broker, set_as_current=False)
    raw.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "1")),
        task_acks_late=os.environ.get("BENCH_ACKS_LATE", "1") == "1",
        worker_send_task_events=os.environ.get("BENCH_EVENTS", "0") == "1",
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        enable_utc=True,
        timezone="UTC",
    )
    if broker.startswith(("amqp", "pyamqp")):
        queue_type = os.environ.get("BENCH_QUEUE_TYPE", "quorum")
        raw.conf.update(
            task_default_queue_type=queue_type,
            task_create_missing_queue_type=queue_type,
            worker_detect_quorum_queues=True,
        )
    return raw


app = create_app(BROKER)
app.set_current()

_client: redis.Redis | None = None
_client_pid = 0


def _redis() -> redis.Redis:
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = redis.Redis.from_url(RECORD)
        _client_pid = os.getpid()
    return _client


def _record(key: str) -> None:
    now = repr(time.time())
    pipe = _redis().pipeline(transaction=False)
    pipe.incr(f"{key}:done")
    pipe.set(f"{key}:first", now, nx=True)
    pipe.set(f"{key}:last", now)
    pipe.execute()


@app.task(name="bench.noop")  # type: ignore[untyped-decorator]
def noop(key: str) -> None:
    """Nothing but the completion record."""
    _record(key)


_pg: Any = None
_pg_pid = 0


@app.task(name="bench.upsert")  # type: ignore[untyped-decorator]
def upsert(key: str, i: int) -> None:
    """ANCHORS' "stack floor": UPSERT one row into PostgreSQL in its own transaction
    (``BENCH_PG``, table ``bench_floor``), then record the completion."""
    global _pg, _pg_pid
    if _pg is None or _pg_pid != os.getpid():
        import psycopg

        _pg = psycopg.connect(
            os.environ["BENCH_PG"].replace("postgresql+psycopg://", "postgresql://")
        )
        _pg_pid = os.getpid()
    with _pg.transaction():
        _pg.execute(
            "INSERT INTO bench_floor (i, payload, n) VALUES (%s, %s, 1) "
            "ON CONFLICT (i) DO UPDATE SET n = bench_floor.n + 1",
            (i, f"result {i}"),
        )
    _record(key)


@app.task(name="bench.sleep")  # type: ignore[untyped-decorator]
def sleep(key: str, seconds: float) -> None:
    """Sleep, then record the completion."""
    time.sleep(seconds)
    _record(key)
