"""``studyq worker``: start a Celery worker that executes the runs of distributed sweeps.

The worker runs in this process (:func:`workers.serve.serve`, reached through the entry point
``serve`` of :mod:`orchestrator.contracts.worker_api`), configured from the settings
(``STUDYQ_BROKER_URL``, ``STUDYQ_DATABASE_URL``, ...) with the flags below on top; it is the
same worker as ``celery -A workers.app worker``, with studyq's defaults (no gossip or
mingle: workers share nothing but the broker and the database). Celery is imported only when
the command runs, so the rest of the CLI never pays for it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from orchestrator.cli import add_command, positive_int

__all__ = ["POOLS", "register"]

POOLS = ("prefork", "threads", "solo")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _queue_list(text: str) -> list[str]:
    queues = [name.strip() for name in text.split(",") if name.strip()]
    if not queues:
        raise argparse.ArgumentTypeError(f"expected queue names, got {text!r}")
    return queues


def register(subparsers: Any) -> None:
    """Add ``studyq worker``."""
    parser = add_command(
        subparsers,
        "worker",
        help="Start a worker that executes runs of distributed sweeps: it takes run messages "
        "from the broker, claims each run in the result store, executes it and records the "
        "result there. Start one per machine (or more); SIGTERM shuts it down warmly.",
        example="STUDYQ_BROKER_URL=redis://localhost:6379/0 "
        "STUDYQ_DATABASE_URL=postgresql://studyq@localhost/studyq studyq worker --concurrency 4",
        handler=_worker,
    )
    parser.add_argument(
        "--concurrency",
        "-c",
        type=positive_int,
        default=None,
        help="runs at a time (default: the CPU count)",
    )
    parser.add_argument(
        "--pool",
        "-P",
        choices=POOLS,
        default="prefork",
        help="prefork (default): one process per run slot, time limits enforced and agents "
        "using global RNGs stay deterministic; threads: for I/O-bound agents (API calls), no "
        "interruption of hung runs; solo: one run at a time in the worker process",
    )
    parser.add_argument(
        "--queues",
        "-Q",
        type=_queue_list,
        action="extend",
        default=None,
        help="comma-separated queues to take runs from (default: studyq, the default of a "
        "study's execution.queue)",
    )
    parser.add_argument(
        "--loglevel",
        "-l",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="log level (default: INFO, one line per run)",
    )
    parser.add_argument(
        "--hostname",
        "-n",
        default=None,
        help="node name, e.g. gpu1@%%h (default: celery@<host>); must be unique per worker",
    )
    parser.add_argument("--broker", default=None, help="broker URL (default: $STUDYQ_BROKER_URL)")
    parser.add_argument(
        "--db", default=None, help="result store URL (default: $STUDYQ_DATABASE_URL)"
    )


def _worker(args: argparse.Namespace) -> int:
    from orchestrator.contracts.worker_api import worker_entry

    serve = worker_entry("serve")
    return int(
        serve(
            broker=args.broker,
            db=args.db,
            pool=args.pool,
            concurrency=args.concurrency or os.cpu_count() or 1,
            queues=args.queues,
            loglevel=args.loglevel,
            hostname=args.hostname,
        )
    )
