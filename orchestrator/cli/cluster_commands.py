"""Distributed commands: submit, wait, status, dead-letters, resubmit, cancel, check, flower."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from typing import Any

from orchestrator.cli import (
    EXIT_CONNECT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    add_command,
    positive_int,
)
from orchestrator.cli.error_fixes import describe_error as _describe_error
from orchestrator.contracts.broker import secure_broker_url, supported_broker_url
from orchestrator.contracts.errors import BrokerUnavailableError, StoreUnavailableError
from orchestrator.contracts.extensions import ExecutionPolicy
from orchestrator.contracts.settings import load_settings

__all__ = ["register"]

_DB_HELP = "result store URL (default: $STUDYQ_DATABASE_URL)"
_BROKER_HELP = "Celery broker URL (default: $STUDYQ_BROKER_URL)"
_DEFAULT_QUEUE = ExecutionPolicy().queue


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "submit",
        help="Register a study and enqueue every run that still needs running (idempotent: "
        "submitting twice enqueues nothing twice).",
        example="studyq submit study.yaml --broker redis://127.0.0.1:6379/0 "
        "--db postgresql://studyq@127.0.0.1/studyq",
        handler=_submit,
    )
    parser.add_argument("study", help="study file (.yaml, .yml or .json)")
    parser.add_argument(
        "--order",
        choices=("plan", "balanced"),
        default=None,
        help="dispatch order (default: the study's execution.order): balanced publishes "
        "replicate by replicate, shuffled inside each, so a study stopped early stays balanced",
    )
    _urls(parser)
    _progress(parser)

    parser = add_command(
        subparsers,
        "wait",
        help="Show progress from the store and reconcile (re-queue runs whose worker vanished "
        "or whose message was lost) until every run finished. Exit 0 if all succeeded, "
        "1 if some failed.",
        example="studyq wait my-study --db postgresql://studyq@127.0.0.1/studyq "
        "--broker redis://127.0.0.1:6379/0",
        handler=_wait,
    )
    parser.add_argument("study_id", help="the study's study_id")
    parser.add_argument(
        "--timeout", type=float, default=None, help="give up waiting after this many seconds"
    )
    _urls(parser)
    _progress(parser)

    parser = add_command(
        subparsers,
        "status",
        help="Every study in the store with counts, rate, ETA and cost; for one study also by "
        "condition, agent and problem, and the top error classes.",
        example="studyq status my-study",
        handler=_status,
    )
    parser.add_argument("study_id", nargs="?", help="one study (default: all)")
    parser.add_argument(
        "--watch",
        action="store_true",
        help="a live view of one study (bars by condition, agent and problem; rate, ETA, "
        "failures, cost, workers) until Ctrl-C; plain lines until it ends when stdout is not "
        "a terminal. Example: studyq status my-study --watch",
    )
    parser.add_argument(
        "--interval", type=float, default=2.0, help="--watch: seconds between refreshes (2)"
    )
    _urls(parser)

    parser = add_command(
        subparsers,
        "dead-letters",
        help="List the messages workers quarantined from a queue (not JSON, not a run message, "
        "too large, ...), newest first, with why, when and which worker; --purge deletes them.",
        example="studyq dead-letters --queue studyq --limit 5",
        handler=_dead_letters,
    )
    parser.add_argument(
        "--queue", default=_DEFAULT_QUEUE, help=f"the queue (default: {_DEFAULT_QUEUE})"
    )
    parser.add_argument(
        "--limit", type=positive_int, default=20, help="show at most this many (default: 20)"
    )
    parser.add_argument("--purge", action="store_true", help="delete them; prints how many")
    parser.add_argument("--broker", default=None, help=_BROKER_HELP)

    parser = add_command(
        subparsers,
        "resubmit",
        help="Re-run finished runs that match the filters (default: the failed ones), with a "
        "fresh attempt budget.",
        example="studyq resubmit my-study --error timeout --where temperature=0.8",
        handler=_resubmit,
    )
    parser.add_argument("study_id", help="the study's study_id")
    parser.add_argument(
        "--status",
        action="append",
        choices=("failed", "cancelled", "success"),
        help="statuses to re-run (repeatable; default: failed)",
    )
    parser.add_argument(
        "--error", default=None, help="only runs whose error kind, type or message contains TEXT"
    )
    parser.add_argument(
        "--error-class",
        default=None,
        metavar="NAME",
        help="only runs whose error class is exactly NAME (e.g. RateLimited, TimeoutError)",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FACTOR=VALUE",
        help="only runs whose factor (or agent/problem/replicate) equals VALUE (repeatable)",
    )
    _urls(parser)

    parser = add_command(
        subparsers,
        "cancel",
        help="Cancel a study: planned and queued runs never start; running ones finish and "
        "their results are recorded, or are stopped with --terminate. Exit 1 when a worker "
        "holds some runs locked (run it again).",
        example="studyq cancel my-study --terminate",
        handler=_cancel,
    )
    parser.add_argument("study_id", help="the study's study_id")
    parser.add_argument(
        "--terminate",
        action="store_true",
        help="also stop running runs: cancelled, their agents stopped, their tasks revoked",
    )
    _urls(parser)

    parser = add_command(
        subparsers,
        "check",
        help="Health check: the broker and the database are reachable and the schema is "
        "current. Exit 0 when healthy, 3 when a service is unreachable, 2 when the schema is "
        "behind.",
        example="studyq check --db postgresql://studyq@db/studyq --broker redis://redis:6379/0",
        handler=_check,
    )
    _urls(parser)
    parser.add_argument(
        "--no-broker", action="store_true", help="check only the database (embedded use)"
    )

    parser = add_command(
        subparsers,
        "flower",
        help="Start Flower (Celery's monitor) on the study broker; binds to 127.0.0.1 unless "
        "basic auth is configured (STUDYQ_FLOWER_BASIC_AUTH=user:password).",
        example="STUDYQ_FLOWER_BASIC_AUTH=lab:secret studyq flower --port 5555 --address 0.0.0.0",
        handler=_flower,
    )
    parser.add_argument("--broker", default=None, help=_BROKER_HELP)
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--address", default="127.0.0.1")


def _urls(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help=_DB_HELP)
    parser.add_argument("--broker", default=None, help=_BROKER_HELP)


def _progress(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--progress", dest="progress", action="store_true", default=None)
    group.add_argument("--no-progress", dest="progress", action="store_false")


def _submit(args: argparse.Namespace) -> int:
    from orchestrator.distributed import submit_study

    report = submit_study(
        args.study,
        db=args.db,
        broker=args.broker,
        show_progress=args.progress,
        order=args.order,
    )
    state = "registered" if report.created else "already registered"
    print(
        f"{report.study_id}: {state}; {report.planned} runs planned, {report.published} "
        f"enqueued now ({report.published / max(report.seconds, 1e-9):,.0f} runs/s). "
        f"Next: studyq wait {report.study_id}"
    )
    return EXIT_OK


def _wait(args: argparse.Namespace) -> int:
    from orchestrator.distributed import wait_study

    report = wait_study(
        args.study_id,
        db=args.db,
        broker=args.broker,
        show_progress=args.progress,
        timeout_s=args.timeout,
    )
    counts = report.counts
    print(
        f"{report.study_id}: {counts.get('success', 0)} succeeded, {counts.get('failed', 0)} "
        f"failed, {counts.get('cancelled', 0)} cancelled"
        + (" (timed out waiting)" if report.timed_out else "")
    )
    from orchestrator.insight.summary import print_outcome_table

    print_outcome_table(report.study_id, db=args.db)  # the study's answer, and the report
    if report.paused:  # a spent budget or a tripped breaker: the study waits for the user
        print(f"{report.study_id}: {report.paused}", file=sys.stderr)
        return EXIT_FAILED
    if report.failed:
        print(
            f"`studyq status {report.study_id}` shows why; "
            f"`studyq resubmit {report.study_id}` re-runs the failed runs.",
            file=sys.stderr,
        )
    return EXIT_OK if report.complete and not report.failed else EXIT_FAILED


def _fmt_rate(rate: float | None) -> str:
    return "-" if not rate else f"{rate:,.1f}/s"


def _fmt_eta(eta: float | None) -> str:
    if eta is None:
        return "-"
    minutes, seconds = divmod(int(eta), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def _fmt_when(when: Any) -> str:
    return when.strftime("%Y-%m-%d %H:%M") if isinstance(when, datetime) else str(when)


def _status(args: argparse.Namespace) -> int:
    from orchestrator.distributed import study_status
    from orchestrator.watch import watch_command

    if args.watch:  # the live view (orchestrator/watch.py)
        return watch_command(args)
    statuses = study_status(args.study_id, db=args.db)
    if not statuses:
        print("no studies in the store")
        return EXIT_OK
    header = (
        f"{'study':<28} {'submitted':<16} {'by':<20} {'runs':>8} {'success':>8} {'failed':>7} "
        f"{'cancelled':>9} {'running':>8} {'queued':>8} {'rate':>9} {'eta':>8} {'cost $':>9}"
    )
    print(header)
    for status in statuses:
        c = status.counts
        print(
            f"{status.study_id[:28]:<28} {_fmt_when(status.submitted_at):<16} "
            f"{status.submitted_by[:20]:<20} {status.run_count:>8,} {c.get('success', 0):>8,} "
            f"{c.get('failed', 0):>7,} {c.get('cancelled', 0):>9,} {c.get('running', 0):>8,} "
            f"{c.get('queued', 0) + c.get('planned', 0):>8,} {_fmt_rate(status.rate_per_s):>9} "
            f"{'paused' if status.dispatch_fix else _fmt_eta(status.eta_s):>8} "
            f"{status.cost_usd:>9.2f}"
        )
        if status.dispatch:  # stopped: budget / paused: breaker / the budget so far
            fix = f"; `{status.dispatch_fix}` continues it" if status.dispatch_fix else ""
            print(f"  {status.dispatch}{fix}")
        for by, groups in status.by.items():
            print(f"\n  by {by}")
            for key, per_status in sorted(groups.items())[:30]:
                parts = ", ".join(f"{name} {count}" for name, count in per_status.items() if count)
                print(f"    {key[:60]:<60} {parts}")
        if status.top_errors:
            print("\n  top errors")
            embedded = _embedded_store(args.db)
            for error in status.top_errors:
                print(f"    {_describe_error(error, status.study_id, embedded=embedded)}")
        if args.study_id is not None:
            _print_dead_letter_count(status.queue, args.broker)
    return EXIT_OK


def _embedded_store(flag: str | None) -> bool:
    """Whether the store is a SQLite file, which only ``studyq run`` (embedded) writes."""
    from orchestrator.contracts.errors import StoreError
    from orchestrator.store import normalize_url

    try:
        return normalize_url(flag or load_settings().database_url).get_backend_name() == "sqlite"
    except StoreError:
        return False


def _broker_url(flag: str | None) -> str | None:
    return secure_broker_url(flag) if flag else load_settings().broker_url


def _print_dead_letter_count(queue: str, broker_flag: str | None) -> None:
    """``dead letters: N`` for the study's queue; nothing for an embedded store (no broker)."""
    from orchestrator.executors.transport import open_transport

    broker_url = _broker_url(broker_flag)
    if not broker_url:
        return
    try:
        with open_transport(load_settings(), broker_url) as transport:
            count = transport.dead_letter_count(queue)
    except BrokerUnavailableError:
        print(f"\n  dead letters: unknown (the broker of queue {queue} is unreachable)")
        return
    hint = f" (`studyq dead-letters --queue {queue}` shows them)" if count else ""
    print(f"\n  dead letters: {count:,} on queue {queue}{hint}")


def _dead_letters(args: argparse.Namespace) -> int:
    from orchestrator.executors.transport import open_transport

    broker_url = _broker_url(args.broker)
    if not broker_url:
        print("studyq dead-letters: set STUDYQ_BROKER_URL or pass --broker", file=sys.stderr)
        return EXIT_USAGE
    with open_transport(load_settings(), broker_url) as transport:
        if args.purge:
            purged = transport.purge_dead_letters(args.queue)
            print(f"queue {args.queue}: purged {purged:,} dead letter(s)")
            return EXIT_OK
        total = transport.dead_letter_count(args.queue)
        letters = transport.dead_letters(args.queue, limit=args.limit)
    if not letters:
        print(f"queue {args.queue}: no dead letters")
        return EXIT_OK
    shown = f", the newest {len(letters)} shown" if total > len(letters) else ""
    print(f"queue {args.queue}: {total:,} dead letter(s){shown}, newest first")
    for letter in letters:
        when = letter.time[:19].replace("T", " ")
        print(
            f"\n{when} UTC  {letter.reason}  worker {letter.worker or '-'}  "
            f"task {letter.task_id or '-'}  {letter.size:,} bytes"
        )
        print(f"  {letter.detail}")
        print(f"  message: {letter.preview(90)}")
    return EXIT_OK


def _parse_where(items: list[str]) -> dict[str, str]:
    where = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"studyq resubmit: error: --where expects FACTOR=VALUE, got {item!r}")
        where[key] = value
    return where


def _resubmit(args: argparse.Namespace) -> int:
    from orchestrator.distributed import resubmit

    try:
        where = _parse_where(args.where)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    report = resubmit(
        args.study_id,
        statuses=args.status or ["failed"],
        error_contains=args.error,
        where=where or None,
        db=args.db,
        broker=args.broker,
        error_class=args.error_class,
    )
    print(f"{args.study_id}: {report.planned} runs reset, {report.published} enqueued")
    if args.error_class and not report.planned:
        _error_class_note(args)
    if report.published:
        print(
            "note: a running worker keeps the agent code it imported at its first run of the "
            "study; if you changed that code, restart the workers so the runs use it.",
            file=sys.stderr,
        )
    return EXIT_OK


def _error_class_note(args: argparse.Namespace) -> None:
    """Say which error classes the study's failed runs have, when --error-class matched none
    (a misspelt class is then seen at once)."""
    from orchestrator.contracts.settings import load_settings
    from orchestrator.dashboard.queries import error_classes
    from orchestrator.store.lookup import open_existing

    url = args.db or load_settings().database_url
    with open_existing(url, command="resubmit") as store, store.engine.connect() as connection:
        classes = error_classes(connection, args.study_id)
    listed = ", ".join(f"{name} ({count})" for name, count in classes) or "none"
    print(
        f"note: no run of {args.study_id} matched --error-class {args.error_class}; the error "
        f"classes of its failed runs: {listed}.",
        file=sys.stderr,
    )


def _cancel(args: argparse.Namespace) -> int:
    from orchestrator.distributed import cancel

    report = cancel(args.study_id, terminate=args.terminate, db=args.db, broker=args.broker)
    stopped = (
        f" ({len(report.terminated)} of them stopped while running)" if report.terminated else ""
    )
    left = f"; {report.running} running, left to finish" if report.running else ""
    print(f"{args.study_id}: {report.cancelled} runs cancelled{stopped}{left}")
    if report.locked:
        again = f"studyq cancel {args.study_id}" + (" --terminate" if args.terminate else "")
        print(
            f"{report.locked} runs are not cancelled yet: a worker holds their rows locked (it "
            f"may be frozen). Run `{again}` again later.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from orchestrator.store import create_engine_for, head_revision, is_current, mask_url

    settings = load_settings()
    db_url = args.db or settings.database_url
    healthy = EXIT_OK
    from orchestrator.contracts.errors import StoreError
    from orchestrator.store.lookup import missing_sqlite_file

    try:
        missing = missing_sqlite_file(db_url)  # connecting would create an empty one
        if missing:
            print(
                f"database {mask_url(db_url)}: no such file {missing}. Fix: `studyq db upgrade` "
                "creates it, or point --db / STUDYQ_DATABASE_URL at the store.",
                file=sys.stderr,
            )
            return EXIT_USAGE
        engine = create_engine_for(db_url)
        try:
            current = is_current(engine)
        finally:
            engine.dispose()
    except StoreUnavailableError as exc:  # the message is masked
        print(f"database {mask_url(db_url)}: UNREACHABLE. {exc}", file=sys.stderr)
        return EXIT_CONNECT
    except StoreError as exc:  # a URL studyq cannot use, or the database refused (masked)
        print(f"database {mask_url(db_url)}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # any other failure to connect
        print(f"database {mask_url(db_url)}: UNREACHABLE ({type(exc).__name__})", file=sys.stderr)
        return EXIT_CONNECT
    if current:
        print(f"database {mask_url(db_url)}: ok (schema {head_revision()})")
    else:
        print(
            f"database {mask_url(db_url)}: schema is not current; run `studyq db upgrade`",
            file=sys.stderr,
        )
        healthy = EXIT_USAGE
    if args.no_broker:
        return healthy
    broker_url = args.broker or settings.broker_url
    if not broker_url:
        print("broker: not configured (set STUDYQ_BROKER_URL or pass --broker)", file=sys.stderr)
        return EXIT_USAGE
    from orchestrator.contracts.errors import SettingsError
    from orchestrator.executors.celery import check_broker

    try:
        source = "--broker" if args.broker else "STUDYQ_BROKER_URL"
        broker_url = supported_broker_url(broker_url, source=source)
    except SettingsError as exc:  # kombu would say KeyError
        print(f"broker {mask_url(broker_url)}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_broker(broker_url)
    except SettingsError as exc:  # a refused password; the message names the broker
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except BrokerUnavailableError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONNECT
    print(f"broker {mask_url(broker_url)}: ok")
    return healthy


def _flower(args: argparse.Namespace) -> int:
    import importlib.util

    from orchestrator.store import mask_url

    if importlib.util.find_spec("flower") is None:  # celery would say "No such command"
        print(
            "studyq flower: the flower package is not installed. "
            "Fix: pip install 'studyq[flower]'.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    settings = load_settings()
    broker_url = secure_broker_url(args.broker) if args.broker else settings.broker_url
    if not broker_url:
        print("studyq flower: set STUDYQ_BROKER_URL or pass --broker", file=sys.stderr)
        return EXIT_USAGE
    auth = os.environ.get("STUDYQ_FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_BASIC_AUTH")
    if auth and not all(
        user and password
        for user, _, password in (entry.partition(":") for entry in auth.split(","))
    ):
        print(
            "studyq flower: STUDYQ_FLOWER_BASIC_AUTH must be user:password (comma-separated "
            "for several), each with a non-empty user and password.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.address not in ("127.0.0.1", "localhost", "::1") and not auth:
        print(
            "studyq flower: refusing to listen on a public address without basic auth. "
            "Fix: set STUDYQ_FLOWER_BASIC_AUTH=user:password, or keep --address 127.0.0.1.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    argv = [
        "celery",
        "--broker",
        broker_url,
        "flower",
        f"--port={args.port}",
        f"--address={args.address}",
        # Flower's default list hides args, which is where a run's readable name is, and
        # the exception, which is a failed run's error class and message (workers.failures).
        "--tasks_columns=name,uuid,state,args,exception,received,runtime,worker",
    ]
    if auth:
        argv.append(f"--basic-auth={auth}")
    print(f"flower on http://{args.address}:{args.port} for broker {mask_url(broker_url)}")
    from orchestrator.executors.celery import run_flower

    try:
        return run_flower(argv)
    except BrokerUnavailableError:
        return EXIT_CONNECT
