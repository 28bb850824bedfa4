"""``studyq run``, ``studyq export`` and ``studyq db``: run a study and get its artifacts."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from orchestrator.cli import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    add_command,
    positive_float,
    positive_int,
)
from orchestrator.contracts.errors import StudyConflictError
from orchestrator.contracts.settings import load_settings
from orchestrator.study.plan import DISPATCH_ORDERS

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "run",
        help="Run every run of a study that has no recorded success, then export its "
        "artifacts. Embedded (this machine, SQLite) unless --broker names a Celery broker.",
        example="studyq run examples/quickstart/study.yaml --jobs 4",
        handler=_run,
    )
    parser.add_argument("study", help="study file (.yaml, .yml or .json)")
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="runs at a time (default: run_budget.parallelism if the study sets it, else "
        "the CPU count); 1 runs in this process",
    )
    parser.add_argument(
        "--threads",
        action="store_true",
        help="run jobs in threads instead of processes (for I/O-bound agents such as API "
        "calls; agents must then use the seed/rng they are handed to stay deterministic)",
    )
    parser.add_argument(
        "--db",
        default=None,
        help="result store URL (default: $STUDYQ_DATABASE_URL, else sqlite:///studyq.db)",
    )
    parser.add_argument(
        "--broker",
        default=None,
        help="run distributed: submit to this Celery broker and wait (same as `studyq submit` "
        "then `studyq wait`); workers must be running",
    )
    parser.add_argument("--limit", type=positive_int, default=None, help="run at most N runs")
    parser.add_argument("--order", choices=DISPATCH_ORDERS, default=None, help="dispatch order")
    parser.add_argument(
        "--timeout", type=positive_float, default=None, help="per-run time limit in seconds"
    )
    parser.add_argument(
        "--fail-fast", action="store_true", default=None, help="stop after the first failure"
    )
    parser.add_argument("--out", default=None, help="artifact folder (default: output_dir)")
    parser.add_argument(
        "--no-export", dest="export", action="store_false", help="skip the artifact export"
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="force progress"
    )
    progress.add_argument(
        "--no-progress", dest="progress", action="store_false", help="never show progress"
    )

    parser = add_command(
        subparsers,
        "export",
        help="Write a study's canonical artifacts (design-research-experiments 0.4.0 layout) "
        "from the store; works while the sweep is still running.",
        example="studyq export quickstart-design-search --out artifacts/quickstart",
        handler=_export,
    )
    parser.add_argument("study_id", help="the study's study_id")
    parser.add_argument("--db", default=None, help="result store URL")
    parser.add_argument("--out", default=None, help="folder (default: the study's output_dir)")
    parser.add_argument(
        "--no-run-files",
        dest="run_files",
        action="store_false",
        help="CSV and JSON files only: skip upstream's per-run checkpoint and evidence files "
        "under artifacts/ (about 20 KB and 1 ms per run; drexp export-analysis and draft-paper "
        "need them)",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="processes that write, at most one per core; the files are the same either way. "
        "Default: events, evaluations and attempts tables in a second process (forked, "
        "about 10 ms) while this one writes runs.csv. 1: this process only. N: that second "
        "process, and the per-run files in N processes (starting them takes about 0.3 s, "
        "so that pays from a few thousand runs)",
    )

    parser = add_command(
        subparsers,
        "db",
        help="Manage the result store's schema.",
        example="studyq db upgrade --db postgresql://studyq@db/studyq",
        handler=_db,
    )
    parser.add_argument("action", choices=("upgrade", "current"), help="upgrade to head, or show")
    parser.add_argument("--db", default=None, help="result store URL")


def _run(args: argparse.Namespace) -> int:
    try:
        return _run_distributed(args) if args.broker else _run_embedded(args)
    except StudyConflictError as exc:  # the study file changed under the same study_id
        print(f"studyq: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _run_embedded(args: argparse.Namespace) -> int:
    from orchestrator.cli.study_commands import check_bindings
    from orchestrator.embedded import run_embedded
    from orchestrator.study.plan import prepare
    from orchestrator.watch import live_run_view

    # Runs resolve their ids on this machine: a binding that cannot resolve here would fail
    # every run, so refuse it up front (exit 2, nothing registered). `submit` does not check:
    # its workers may have other code installed.
    prepared = prepare(args.study, max_bytes=load_settings().max_study_bytes)
    check_bindings(prepared)
    # On a terminal the live view of `studyq status --watch` replaces the tqdm bar.
    with live_run_view(prepared.study.study_id, args.db, show=args.progress) as live:
        outcome = run_embedded(
            prepared,  # checked above: not loaded and planned a second time
            jobs=args.jobs,
            pool="thread" if args.threads else "process",
            db=args.db,
            show_progress=False if live else args.progress,
            limit=args.limit,
            order=args.order,
            fail_fast=args.fail_fast,
            timeout_s=args.timeout,
            export=args.export,
            output_dir=args.out,
        )
    counts = outcome.counts
    back = outcome.taken_back
    if back is not None and (back.released or back.requeued or back.failed_lost):
        print(
            f"took back the claims of a killed run of this study: {back.released} had not "
            f"started (not charged), {back.requeued} had started (charged an attempt), "
            f"{back.failed_lost} failed as lost (no attempts left)",
            file=sys.stderr,
        )
    print(
        f"{outcome.study_id}: executed {outcome.executed} runs now "
        f"({outcome.succeeded} succeeded, {outcome.failed} failed); "
        f"{outcome.skipped_done} were already done. Store: "
        f"{counts.get('success', 0)} success, {counts.get('failed', 0)} failed, "
        f"{counts.get('planned', 0) + counts.get('queued', 0)} not run, "
        f"{counts.get('running', 0)} running elsewhere, of {outcome.planned}."
    )
    if outcome.export is not None:
        partial = " (partial)" if outcome.export.partial else ""
        print(f"artifacts{partial}: {outcome.export.out_dir}")
    from orchestrator.insight.summary import print_outcome_table

    print_outcome_table(outcome.study_id, db=args.db)  # the study's answer, and the report
    if outcome.held_elsewhere:
        print(
            f"{outcome.held_elsewhere} runs are held by another live process (status "
            "`running`): not run here. `studyq status` shows them; run again once it ends.",
            file=sys.stderr,
        )
    if outcome.interrupted:
        print("interrupted: run the same command again to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.held_elsewhere and args.limit is None:
        return EXIT_FAILED
    if outcome.paused:  # a spent budget or a tripped breaker stopped dispatch
        print(f"{outcome.study_id}: {outcome.paused}", file=sys.stderr)
        return EXIT_FAILED
    if counts.get("failed", 0):
        print(
            "some runs failed: `studyq status` shows why; `studyq run` again re-runs them.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _run_distributed(args: argparse.Namespace) -> int:
    from orchestrator.distributed import submit_study, wait_study
    from orchestrator.export import export_artifacts
    from orchestrator.store import ResultStore

    report = submit_study(
        args.study,
        db=args.db,
        broker=args.broker,
        show_progress=args.progress,
        order=args.order,
    )
    print(f"{report.study_id}: {report.published} runs enqueued; waiting for workers")
    waited = wait_study(
        report.study_id, db=args.db, broker=args.broker, show_progress=args.progress
    )
    if args.export:
        with ResultStore.open(args.db or load_settings().database_url) as store:
            exported = export_artifacts(store, report.study_id, args.out)
        print(f"artifacts: {exported.out_dir}")
    counts = waited.counts
    print(
        f"{report.study_id}: {counts.get('success', 0)} success, {counts.get('failed', 0)} failed"
    )
    if waited.paused:  # a spent budget or a tripped breaker
        print(f"{report.study_id}: {waited.paused}", file=sys.stderr)
    return EXIT_OK if waited.complete and not waited.failed else EXIT_FAILED


def _export(args: argparse.Namespace) -> int:
    from orchestrator.export import export_artifacts
    from orchestrator.store.lookup import open_existing, require_study

    url = args.db or load_settings().database_url
    with open_existing(url, command="export") as store:
        require_study(store, args.study_id, command="export")
        report = export_artifacts(
            store, args.study_id, args.out, run_files=args.run_files, jobs=args.jobs
        )
    state = (
        f"partial: {report.runs} of {report.runs_planned} runs finished"
        if report.partial
        else f"{report.runs} runs"
    )
    print(
        f"{args.study_id}: wrote {report.out_dir} ({state}, {report.evaluations} evaluations, "
        f"{report.events} events)"
    )
    return EXIT_OK


def _db(args: argparse.Namespace) -> int:
    from orchestrator.store import current_revision, head_revision, mask_url, upgrade

    url = args.db or load_settings().database_url
    if args.action == "upgrade":
        before = current_revision(url)
        upgrade(url)
        print(f"{mask_url(url)}: schema {before or 'empty'} -> {head_revision()}")
        return EXIT_OK
    current = current_revision(url)
    state = "current" if current == head_revision() else f"behind (head is {head_revision()})"
    print(f"{mask_url(url)}: schema {current or 'empty'} ({state})")
    return EXIT_OK if current == head_revision() else EXIT_USAGE
