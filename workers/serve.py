"""The body of ``studyq worker`` (the coordinator's CLI reaches it through the entry point
``serve``: :mod:`orchestrator.contracts.worker_api`): a Celery worker in this process, with
studyq's defaults (no gossip or mingle: workers share nothing but the broker and the
database)."""

from __future__ import annotations

from typing import Any

from workers.config import load_worker_settings

__all__ = ["describe", "serve"]


def describe(settings: Any, *, pool: str, concurrency: int, queues: list[str]) -> str:
    """The start-up banner, with every password masked."""
    from orchestrator.store import mask_url

    broker = mask_url(str(settings.broker_url)) if settings.broker_url else "(not set)"
    return (
        f"studyq worker: broker {broker}\n"
        f"               database {mask_url(settings.database_url)}\n"
        f"               queues {', '.join(queues)}; pool {pool} x {concurrency}; lease "
        f"{settings.lease_s:g} s (heartbeat {settings.heartbeat_s:g} s); shutdown grace "
        f"{settings.shutdown_grace_s:g} s"
    )


def serve(
    *,
    broker: str | None,
    db: str | None,
    pool: str,
    concurrency: int,
    queues: list[str] | None,
    loglevel: str,
    hostname: str | None,
) -> int:
    """Start a worker in this process and return its exit code when it stops."""
    from celery.utils.nodenames import default_nodename, host_format

    from workers.app import DEFAULT_QUEUE, create_app

    settings = load_worker_settings(broker_url=broker, database_url=db)
    app = create_app(settings)
    queues = queues or [DEFAULT_QUEUE]
    if pool == "solo":
        concurrency = 1
    print(describe(settings, pool=pool, concurrency=concurrency, queues=queues), flush=True)
    # Building the worker checks the store (workers.app): a schema of another version stops
    # it with exit code 2; an unreachable database only warns (runs wait for it).
    worker = app.Worker(
        hostname=host_format(default_nodename(hostname)),
        pool_cls=pool,
        concurrency=concurrency,
        queues=queues,
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
    )
    worker.start()
    return int(worker.exitcode or 0)
