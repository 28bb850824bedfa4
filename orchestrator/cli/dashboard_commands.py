"""``studyq dashboard``: serve the study dashboard (orchestrator/dashboard/) with uvicorn."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import socket
import sys
from urllib.parse import quote

from orchestrator.cli import EXIT_OK, EXIT_USAGE, add_command

__all__ = ["register"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_NEEDS = ("starlette", "jinja2", "uvicorn")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = add_command(
        subparsers,
        "dashboard",
        help="Serve the study dashboard in the browser: every study's progress, one study's "
        "plots and tables, failures and runs, refreshed live. Read-only unless "
        "STUDYQ_DASHBOARD_TOKEN is set (then resubmit and cancel need that token).",
        example="studyq dashboard --db postgresql://studyq@db/studyq --port 8050",
        handler=_dashboard,
    )
    parser.add_argument(
        "study_id",
        nargs="?",
        default=None,
        help="a study to open first (the printed URL is its page); all studies are served",
    )
    parser.add_argument(
        "--db",
        default=None,
        help="result store URL (default: $STUDYQ_DATABASE_URL, else sqlite:///studyq.db)",
    )
    parser.add_argument(
        "--broker",
        default=None,
        help="broker resubmit publishes to (default: STUDYQ_BROKER_URL)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8050, help="port to listen on")


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _dashboard(args: argparse.Namespace) -> int:
    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"studyq dashboard: {', '.join(missing)} not installed. "
            "Fix: pip install 'studyq[dashboard]'.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not 0 < args.port < 65536:
        print(
            f"studyq dashboard: --port {args.port} is not a port. Fix: pass 1-65535.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from orchestrator.contracts.broker import secure_broker_url
    from orchestrator.contracts.settings import load_settings
    from orchestrator.store import mask_url
    from orchestrator.store.engine import normalize_url
    from orchestrator.store.lookup import missing_sqlite_file

    settings = load_settings()
    url = args.db or settings.database_url
    normalize_url(url)  # a malformed URL is a usage error (StoreURLError), before listening
    missing_file = missing_sqlite_file(url)
    if missing_file:
        print(
            f"studyq dashboard: no store at {mask_url(url)}: the file {missing_file} does not "
            "exist. Fix: run from the folder the study ran in, or point --db / "
            "STUDYQ_DATABASE_URL at the store.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.study_id:  # a study that is not there is a usage error, before listening
        from orchestrator.store.lookup import open_existing, require_study

        with open_existing(url, command="dashboard") as store:
            require_study(store, args.study_id, command="dashboard")
    broker = secure_broker_url(args.broker) if args.broker else None
    if not _port_free(args.host, args.port):
        print(
            f"studyq dashboard: cannot listen on {args.host}:{args.port} (in use, or not an "
            "address of this machine). Fix: pass another --port or --host.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    token = settings.dashboard_token
    if args.host not in _LOOPBACK and not token:
        print(
            f"studyq dashboard: warning: listening on {args.host} without "
            "STUDYQ_DASHBOARD_TOKEN: anyone who can reach it can read every study "
            "(read-only; actions are off).",
            file=sys.stderr,
        )
    import uvicorn

    from orchestrator.dashboard.app import create_app

    app = create_app(url, settings, broker=broker)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    page = f"studies/{quote(args.study_id, safe='')}" if args.study_id else ""
    mode = "actions need the token" if token else "read-only"
    print(
        f"studyq dashboard: http://{shown}:{args.port}/{page} on {mask_url(url)} ({mode}); "
        "Ctrl-C stops it.",
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        server_header=False,
    )
    return EXIT_OK
