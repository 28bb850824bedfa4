"""Managing the studies in a store: ``studyq delete``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from orchestrator.cli import EXIT_OK, EXIT_USAGE, add_command
from orchestrator.contracts.settings import load_settings

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "delete",
        help="Delete a study and every run, result, evaluation and event of it from the store "
        "(exported files are left alone). Refused while runs are planned, queued or running: "
        "`studyq cancel` them first. Without --yes it only says what it would delete.",
        example="studyq delete my-study --yes --db postgresql://studyq@127.0.0.1/studyq",
        handler=_delete,
    )
    parser.add_argument("study_id", help="the study's study_id")
    parser.add_argument("--yes", action="store_true", help="delete it (there is no undo)")
    parser.add_argument(
        "--db", default=None, help="result store URL (default: $STUDYQ_DATABASE_URL)"
    )


def _delete(args: argparse.Namespace) -> int:
    from orchestrator.store.lookup import open_existing, require_study

    url = args.db or load_settings().database_url
    with open_existing(url, command="delete") as store:
        require_study(store, args.study_id, command="delete")
        counts = {status: n for status, n in store.count_by_status(args.study_id).items() if n}
        held = ", ".join(f"{n:,} {status}" for status, n in counts.items()) or "no runs"
        if not args.yes:
            print(
                f"studyq delete: would delete study '{args.study_id}' from {store.url} "
                f"({held}). Fix: pass --yes to delete it; there is no undo.",
                file=sys.stderr,
            )
            return EXIT_USAGE
        deleted = store.delete_study(args.study_id, if_idle=True)
    if deleted:
        print(f"{args.study_id}: deleted ({held})")
    else:  # deleted by someone else between the two statements
        print(f"{args.study_id}: already gone")
    return EXIT_OK
