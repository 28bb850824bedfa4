"""``studyq report STUDY``: a study's self-contained HTML report, or a Markdown summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from orchestrator.cli import EXIT_OK, EXIT_USAGE, add_command
from orchestrator.contracts.settings import load_settings

__all__ = ["register"]


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "report",
        help="Write one self-contained HTML page about a study (design, hypotheses, outcome "
        "by condition with confidence intervals, completion, agents, problems, failures, cost, "
        "provenance; plots inline, opens offline), or with --format md a Markdown summary.",
        example="studyq report quickstart-design-search --out report.html",
        handler=_report,
    )
    parser.add_argument("study_id", help="the study's study_id")
    parser.add_argument(
        "--out",
        default=None,
        help="file to write (default: report.html, or report.md with --format md; '-' "
        "prints to stdout)",
    )
    parser.add_argument(
        "--format", choices=("html", "md"), default="html", help="html (default) or md"
    )
    parser.add_argument(
        "--db",
        default=None,
        help="result store URL (default: $STUDYQ_DATABASE_URL, else sqlite:///studyq.db)",
    )


def _report(args: argparse.Namespace) -> int:
    from orchestrator.insight.aggregates import read_insight
    from orchestrator.insight.report import provenance, render_html, render_markdown
    from orchestrator.store.engine import transaction
    from orchestrator.store.lookup import open_existing, require_study

    url = args.db or load_settings().database_url
    out = args.out or ("report.md" if args.format == "md" else "report.html")
    target = None if out == "-" else Path(out)
    if target is not None and target.is_dir():
        print(
            f"studyq report: --out {out} is a folder. Fix: name a file, e.g. "
            f"--out {target / ('report.' + args.format)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    with open_existing(url, command="report") as store:  # a missing SQLite file: exit 2
        with transaction(store.engine, readonly=True) as connection:
            insight = read_insight(connection, args.study_id)
        if insight is None:
            require_study(store, args.study_id, command="report")  # names the known ids
            return EXIT_USAGE
        prov = provenance(insight, store=store.url)
    text = render_markdown(insight, prov) if args.format == "md" else render_html(insight, prov)
    if target is None:
        sys.stdout.write(text)
        return EXIT_OK
    if target.parent != Path() and not target.parent.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    t = insight.totals
    print(
        f"{args.study_id}: wrote {target} ({target.stat().st_size / 1024:,.0f} KB; {t.runs:,} "
        f"runs, {t.counts.get('success', 0):,} success, {t.counts.get('failed', 0):,} failed)"
    )
    return EXIT_OK
