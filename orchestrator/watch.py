"""The live view of one study: ``studyq status STUDY --watch``, and ``studyq run`` on a terminal.

A :class:`Snapshot` is read from the store in one read-only transaction of SQL aggregates
(counts per status, per condition, agent and problem; the recent finishing rate; cost;
failures by error class with the latest message; workers seen in the last minute): no run
row is read into memory whatever the study's size, and SQLite's write lock is never taken.
:func:`render` turns it into a ``rich`` renderable; :func:`plain_line` into one line of text
for a log file or a pipe.

:func:`watch_study` redraws the view in place every ``interval`` seconds until Ctrl-C when
stdout is a terminal (over SSH too: it only writes ANSI text), and otherwise prints one plain
line per refresh and stops once nothing is planned, queued or running.
:func:`live_run_view` shows the same view while ``studyq run`` executes, refreshed from the
same store by a background thread.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import Connection

from orchestrator.contracts.errors import StoreUnavailableError
from orchestrator.contracts.results import RunStatus
from orchestrator.contracts.settings import Settings, load_settings
from orchestrator.store import (
    ResultStore,
    StudyInfo,
    create_engine_for,
    pausing,
    queries,
)
from orchestrator.store.engine import transaction
from orchestrator.store.inspection import condition_labels, finished_span
from orchestrator.store.live import FailureClass, WorkerSeen, failure_classes, workers_seen
from orchestrator.store.lookup import open_existing, require_study

__all__ = [
    "DEFAULT_INTERVAL_S",
    "RATE_WINDOW_S",
    "Snapshot",
    "live_run_view",
    "plain_line",
    "read_snapshot",
    "render",
    "watch_command",
    "watch_study",
]

DEFAULT_INTERVAL_S = 2.0
"""Seconds between refreshes of ``studyq status --watch``."""

RATE_WINDOW_S = 60.0
"""The rate is runs finished over this many recent seconds (less early in a sweep)."""

WORKERS_WINDOW_S = 60.0
"""A worker counts as seen when it claimed, finished or heartbeat within this many seconds."""

_GROUPS_SHOWN = 12
"""Rows per breakdown (condition, agent, problem) at most; the rest are counted in one line.
On a short terminal fewer, so the failures and workers stay on the screen."""

_BREAKDOWN_LINES = 3
"""Lines a breakdown takes besides its rows: title, column names, rule."""

_OPEN = (RunStatus.PLANNED.value, RunStatus.QUEUED.value, RunStatus.RUNNING.value)
_FINISHED = (RunStatus.SUCCESS.value, RunStatus.FAILED.value, RunStatus.CANCELLED.value)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One study's state at one moment, for the live view."""

    study_id: str
    title: str
    run_count: int
    counts: dict[str, int]
    by: dict[str, dict[str, dict[str, int]]]
    """``condition`` (by label), ``agent`` and ``problem`` -> group -> status -> runs."""
    rate_per_s: float | None
    """Recent finishing rate; for a study with nothing left, the rate over its whole span."""
    cost_usd: float
    budget_usd: float | None
    """The study's cost limit: ``studyq budget``'s, else its ``execution.max_cost_usd``."""
    tokens: int = 0
    """Input + output tokens of the finished runs."""
    budget_tokens: int | None = None
    """The study's token limit: ``studyq budget``'s, else its ``execution.max_tokens``."""
    paused: str | None = None
    """Why dispatch is paused (a budget spent, the failure breaker), or None."""
    failures: list[FailureClass] = field(default_factory=list)
    workers: list[WorkerSeen] = field(default_factory=list)
    taken_at: datetime | None = None
    """When it was read (local time, for the header; everything compared uses the
    database clock)."""

    @property
    def finished(self) -> int:
        return sum(self.counts.get(status, 0) for status in _FINISHED)

    @property
    def remaining(self) -> int:
        return sum(self.counts.get(status, 0) for status in _OPEN)

    @property
    def done(self) -> bool:
        """Nothing is planned, queued or running."""
        return self.remaining == 0

    @property
    def eta_s(self) -> float | None:
        if self.done or not self.rate_per_s:
            return None
        return self.remaining / self.rate_per_s


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _limits(connection: Connection, info: StudyInfo) -> tuple[float | None, int | None]:
    """The effective ``(max_cost_usd, max_tokens)``: ``studyq budget``'s values (the
    ``studies`` row) over the study file's ``execution``."""
    execution: Mapping[str, Any] = info.definition.get("execution") or {}
    cost, tokens = pausing.budget_overrides(connection, info.study_id)
    cost = _number(execution.get("max_cost_usd")) if cost is None else cost
    file_tokens = _number(execution.get("max_tokens"))
    tokens = (None if file_tokens is None else int(file_tokens)) if tokens is None else tokens
    return cost, tokens


def _pause_reason(pause: pausing.Pause | None) -> str | None:
    if pause is None:
        return None
    since = pause.paused_at.astimezone().strftime("%H:%M:%S")
    what = {pausing.BUDGET: "a budget is spent", pausing.BREAKER: "the failure breaker tripped"}
    return f"dispatch paused since {since}: {what.get(pause.reason, pause.reason)}"


def _by_label(
    grouped: Mapping[str, dict[str, int]], labels: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    """Counts per condition keyed by its label (with its id when two share a label)."""
    named = [labels.get(condition_id, condition_id) for condition_id in grouped]
    uses = Counter(named)
    return {
        label if uses[label] == 1 else f"{label} ({condition_id})": counts
        for (condition_id, counts), label in zip(grouped.items(), named, strict=True)
    }


def read_snapshot(store: ResultStore, info: StudyInfo, *, lease_s: float) -> Snapshot:
    """The study's state now, in one read-only transaction of aggregates.

    ``lease_s`` is the workers' lease length (``STUDYQ_LEASE_S``): a heartbeat's time is its
    lease's end minus it.
    """
    study_id = info.study_id
    with transaction(store.engine, readonly=True) as connection:
        counts = queries.count_by_status(connection, study_id)
        by = queries.count_by_each(connection, study_id)
        labelled = _by_label(
            by["condition"], condition_labels(connection, study_id, by["condition"])
        )
        by["condition"] = dict(sorted(labelled.items()))
        stats = queries.progress_stats(connection, study_id, window_s=RATE_WINDOW_S)
        rate = stats.recent_rate_per_s
        if not any(counts.get(status, 0) for status in _OPEN):
            # Ended: the rate over its span (first start..last finish), which later wall
            # time does not decay.
            seconds = finished_span(connection, study_id).seconds
            finished = sum(counts.get(status, 0) for status in _FINISHED[:2])
            rate = finished / seconds if finished and seconds else None
        failures = failure_classes(connection, study_id, limit=5)
        workers = workers_seen(connection, study_id, lease_s=lease_s, within_s=WORKERS_WINDOW_S)
        max_cost, max_tokens = _limits(connection, info)
        tokens = pausing.spent(connection, study_id).tokens
        paused = _pause_reason(pausing.pause_of(connection, study_id))
    return Snapshot(
        study_id=study_id,
        title=str(info.definition.get("title", "")),
        run_count=info.run_count,
        counts=counts,
        by=by,
        rate_per_s=rate,
        cost_usd=stats.cost_usd,
        budget_usd=max_cost,
        tokens=tokens,
        budget_tokens=max_tokens,
        paused=paused,
        failures=failures,
        workers=workers,
        taken_at=datetime.now().astimezone(),
    )


# -- formatting ------------------------------------------------------------------------------


def _fmt_rate(rate: float | None) -> str:
    return "-" if not rate else f"{rate:,.1f} runs/s"


def _fmt_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _fmt_eta(snapshot: Snapshot) -> str:
    if snapshot.done:
        return "done"
    eta = snapshot.eta_s  # none while dispatch is paused: the paused reason follows
    return "-" if eta is None or snapshot.paused else _fmt_duration(eta)


def _fmt_budget(snapshot: Snapshot) -> str:
    if snapshot.budget_usd is None:
        text = f"cost ${snapshot.cost_usd:,.2f}"
        if snapshot.budget_tokens is None:
            return text + " (budget: none set)"
    else:
        left = snapshot.budget_usd - snapshot.cost_usd
        text = (
            f"cost ${snapshot.cost_usd:,.2f} of ${snapshot.budget_usd:,.2f} "
            f"(${max(left, 0.0):,.2f} left)"
        )
    if snapshot.budget_tokens is not None:
        left_tokens = max(snapshot.budget_tokens - snapshot.tokens, 0)
        text += f", tokens {snapshot.tokens:,} of {snapshot.budget_tokens:,} ({left_tokens:,} left)"
    elif snapshot.tokens:
        text += f", tokens {snapshot.tokens:,}"
    return text


def _one_line(text: str | None, limit: int = 100) -> str:
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def plain_line(snapshot: Snapshot) -> str:
    """The snapshot as one line: counts, rate, ETA and cost (for a log or a pipe)."""
    c = snapshot.counts
    stamp = snapshot.taken_at.strftime("%H:%M:%S ") if snapshot.taken_at else ""
    waiting = c.get(RunStatus.PLANNED.value, 0) + c.get(RunStatus.QUEUED.value, 0)
    eta = "done" if snapshot.done else f"ETA {_fmt_eta(snapshot)}"
    return (
        f"{stamp}{snapshot.study_id}: {snapshot.finished:,}/{snapshot.run_count:,} finished "
        f"({c.get('success', 0):,} success, {c.get('failed', 0):,} failed, "
        f"{c.get('cancelled', 0):,} cancelled), {c.get('running', 0):,} running, "
        f"{waiting:,} waiting; rate {_fmt_rate(snapshot.rate_per_s)}; {eta}; "
        f"{_fmt_budget(snapshot)}" + (f"; {snapshot.paused}" if snapshot.paused else "")
    )


# -- the rich view ---------------------------------------------------------------------------


def _bar(done: int, total: int, width: int = 28) -> ProgressBar:
    return ProgressBar(total=max(total, 1), completed=done, width=width)


def _row_budget(sizes: list[int], lines: int) -> list[int]:
    """Rows to show of each breakdown so all fit in ``lines`` (at most
    :data:`_GROUPS_SHOWN`): the small ones whole, the rest share what is left. A cut
    breakdown spends one of its rows on the "... N more" line."""
    shown = [0] * len(sizes)
    left = lines
    for rank, index in enumerate(sorted(range(len(sizes)), key=lambda i: sizes[i])):
        share = max(1, left // (len(sizes) - rank))
        whole = min(sizes[index], _GROUPS_SHOWN)
        need = whole + (1 if sizes[index] > whole else 0)
        shown[index] = whole if need <= share else max(0, share - 1)
        left -= shown[index] + (1 if sizes[index] > shown[index] else 0)
    return shown


def _breakdown(name: str, groups: Mapping[str, Mapping[str, int]], rows: int) -> Table:
    table = Table(title=f"by {name}", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    table.add_column(name, overflow="ellipsis", max_width=44, no_wrap=True)
    table.add_column("progress", no_wrap=True)
    table.add_column("finished", justify="right", no_wrap=True)
    table.add_column("success", justify="right", style="green")
    table.add_column("failed", justify="right", style="red")
    table.add_column("running", justify="right", style="cyan")
    items = list(groups.items())
    for key, per_status in items[:rows]:
        total = sum(per_status.values())
        done = sum(per_status.get(status, 0) for status in _FINISHED)
        table.add_row(
            Text(key),
            _bar(done, total),
            f"{done:,}/{total:,}",
            f"{per_status.get('success', 0):,}",
            f"{per_status.get('failed', 0):,}",
            f"{per_status.get('running', 0):,}",
        )
    if len(items) > rows:
        table.add_row(f"... {len(items) - rows:,} more", "", "", "", "", "")
    return table


def _failures(snapshot: Snapshot) -> RenderableType:
    if not snapshot.failures:
        return Text("failures: none", style="green")
    table = Table(
        title="failures by error class", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False
    )
    table.add_column("error class", no_wrap=True)
    table.add_column("runs", justify="right", style="red")
    table.add_column("latest message", overflow="fold")
    for failure in snapshot.failures:
        kind = failure.error_kind or "error"
        cls = f"{kind} ({failure.error_type})" if failure.error_type else kind
        run = f" [{failure.latest_run_id}]" if failure.latest_run_id else ""
        table.add_row(
            Text(cls), f"{failure.count:,}", Text(_one_line(failure.latest_message) + run)
        )
    return table


def _workers(snapshot: Snapshot) -> Text:
    if not snapshot.workers:
        return Text("workers seen in the last minute: none")
    now = max(worker.last_seen for worker in snapshot.workers)
    shown = ", ".join(
        f"{worker.worker} ({worker.running} running, "
        f"{max(0, int((now - worker.last_seen).total_seconds()))} s ago)"
        for worker in snapshot.workers[:8]
    )
    more = f", ... {len(snapshot.workers) - 8} more" if len(snapshot.workers) > 8 else ""
    return Text(f"workers seen in the last minute: {len(snapshot.workers)}: {shown}{more}")


def render(
    snapshot: Snapshot, *, note: str = "", hint: str | None = None, height: int | None = None
) -> RenderableType:
    """The live view of ``snapshot``: header, overall bar, rate/ETA, cost/budget, a bar per
    condition, agent and problem, failures by error class, workers; then ``note`` (a
    warning) or ``hint`` (default: how to quit the watch). With ``height`` (the terminal's
    lines) the breakdowns show fewer rows so the whole view fits."""
    c = snapshot.counts
    stamp = snapshot.taken_at.strftime("%H:%M:%S") if snapshot.taken_at else ""
    title = f" - {snapshot.title}" if snapshot.title else ""
    header = Text.assemble(
        (f"studyq {snapshot.study_id}", "bold"), title, f"   (refreshed {stamp})"
    )
    overall = Table.grid(padding=(0, 2))
    overall.add_row(
        _bar(snapshot.finished, snapshot.run_count, width=40),
        Text(f"{snapshot.finished:,}/{snapshot.run_count:,} finished"),
        Text(
            f"{c.get('success', 0):,} success  {c.get('failed', 0):,} failed  "
            f"{c.get('cancelled', 0):,} cancelled  {c.get('running', 0):,} running  "
            f"{c.get('queued', 0) + c.get('planned', 0):,} waiting"
        ),
    )
    eta = "done" if snapshot.done else f"ETA {_fmt_eta(snapshot)}"
    window = "whole sweep" if snapshot.done else f"last {int(RATE_WINDOW_S)} s"
    speed = Text(f"rate {_fmt_rate(snapshot.rate_per_s)} ({window})   {eta}   ")
    speed.append(_fmt_budget(snapshot))
    parts: list[RenderableType] = [header, overall, speed]
    if snapshot.paused:
        parts.append(Text(snapshot.paused, style="bold yellow"))
    breakdowns = [(name, groups) for name, groups in snapshot.by.items() if groups]
    sizes = [len(groups) for _, groups in breakdowns]
    if height is None:
        rows = [_GROUPS_SHOWN] * len(breakdowns)
    else:
        failure_lines = 3 + len(snapshot.failures) if snapshot.failures else 1
        fixed = len(parts) + failure_lines + 2 + _BREAKDOWN_LINES * len(breakdowns)
        rows = _row_budget(sizes, height - fixed - 1)  # one spare: the cursor's line
    parts.extend(
        _breakdown(name, groups, shown)
        for (name, groups), shown in zip(breakdowns, rows, strict=True)
    )
    parts.extend([_failures(snapshot), _workers(snapshot)])
    if hint is None:
        hint = "done; Ctrl-C quits" if snapshot.done else "Ctrl-C quits"
    if note:
        parts.append(Text(note, style="yellow"))
    elif hint:
        parts.append(Text(hint, style="dim"))
    return Group(*parts)


# -- watching --------------------------------------------------------------------------------


def watch_study(
    study_id: str,
    *,
    db: str | None = None,
    interval: float = DEFAULT_INTERVAL_S,
    settings: Settings | None = None,
    out: TextIO | None = None,
) -> int:
    """Show the live view of ``study_id`` on ``out`` (stdout) every ``interval`` seconds.

    On a terminal the view is redrawn in place until Ctrl-C; elsewhere one plain line is
    printed per refresh until nothing is planned, queued or running. Returns 0 (Ctrl-C
    included: the terminal is restored).

    Raises:
        StudyError: the study is not in the store (the message names those that are), or
            ``db`` names a SQLite file that does not exist (it is not created).
        StoreUnavailableError: the database cannot be reached at the start (later outages
            are shown and retried).
    """
    settings = settings or load_settings()
    stream = out or sys.stdout
    with open_existing(db or settings.database_url, command="status --watch") as store:
        info = require_study(store, study_id, command="status --watch")
        snapshot = read_snapshot(store, info, lease_s=settings.lease_s)
        try:
            if stream.isatty():
                _watch_live(store, info, snapshot, interval, settings, stream)
            else:
                _watch_plain(store, info, snapshot, interval, settings, stream)
        except KeyboardInterrupt:
            pass
    return 0


def _watch_live(
    store: ResultStore,
    info: StudyInfo,
    snapshot: Snapshot,
    interval: float,
    settings: Settings,
    stream: TextIO,
) -> None:
    console = Console(file=stream)
    view = render(snapshot, height=console.height)
    with Live(view, console=console, auto_refresh=False, transient=False) as live:
        while True:
            time.sleep(interval)
            try:
                snapshot = read_snapshot(store, info, lease_s=settings.lease_s)
                live.update(render(snapshot, height=console.height), refresh=True)
            except StoreUnavailableError as exc:
                note = f"store unavailable, retrying every {interval:g} s: {_one_line(str(exc))}"
                live.update(render(snapshot, note=note, height=console.height), refresh=True)


def _watch_plain(
    store: ResultStore,
    info: StudyInfo,
    snapshot: Snapshot,
    interval: float,
    settings: Settings,
    stream: TextIO,
) -> None:
    print(plain_line(snapshot), file=stream, flush=True)
    while not snapshot.done:
        time.sleep(interval)
        try:
            snapshot = read_snapshot(store, info, lease_s=settings.lease_s)
        except StoreUnavailableError as exc:
            print(
                f"store unavailable, retrying: {_one_line(str(exc), 300)}", file=stream, flush=True
            )
            continue
        print(plain_line(snapshot), file=stream, flush=True)


def watch_command(args: argparse.Namespace) -> int:
    """``studyq status STUDY --watch [--interval S]``: check the flags, then watch."""
    from orchestrator.cli import EXIT_USAGE

    if not args.study_id:
        print(
            "studyq status: --watch needs a study id. Fix: `studyq status STUDY_ID --watch` "
            "(`studyq status` lists the study ids).",
            file=sys.stderr,
        )
        return EXIT_USAGE
    interval = getattr(args, "interval", DEFAULT_INTERVAL_S)
    if not interval > 0:
        print(
            f"studyq status: --interval must be more than 0 seconds, got {interval:g}. "
            "Fix: --interval 2",
            file=sys.stderr,
        )
        return EXIT_USAGE
    url = args.db or load_settings().database_url
    return watch_study(args.study_id, db=url, interval=interval)


# -- studyq run ------------------------------------------------------------------------------


@contextlib.contextmanager
def live_run_view(
    study_id: str,
    db: str | None,
    *,
    show: bool | None = None,
    interval: float = 1.0,
    settings: Settings | None = None,
    out: TextIO | None = None,
) -> Iterator[bool]:
    """While the block runs, show the live view of ``study_id`` (refreshed by a background
    thread from its own connection to the store) when ``out`` (stdout) is a terminal and
    ``show`` is not False. Yields whether the view is shown (then the caller draws no other
    progress). The store and the study may not exist yet when the block starts: the view
    waits for them.
    """
    stream = out or sys.stdout
    if show is False or not stream.isatty():
        yield False
        return
    settings = settings or load_settings()
    url = db or settings.database_url
    stop = threading.Event()
    console = Console(file=stream)
    live = Live(Text(f"studyq {study_id}: starting"), console=console, auto_refresh=False)
    reader: dict[str, Any] = {}

    def refresh(hint: str) -> None:
        try:
            if "store" not in reader:
                reader["store"] = ResultStore(create_engine_for(url))
            store: ResultStore = reader["store"]
            info = reader.get("info") or store.find_study(study_id)
            if info is None:
                return
            reader["info"] = info
            snapshot = read_snapshot(store, info, lease_s=settings.lease_s)
            live.update(render(snapshot, hint=hint, height=console.height))
            live.refresh()
        except Exception:  # not created yet, a busy moment: the next refresh tries again
            return  # (the view must never stop the sweep)

    def loop() -> None:
        while not stop.wait(interval):
            refresh("Ctrl-C stops the sweep (finished runs are kept; run again to resume)")

    thread = threading.Thread(target=loop, name="studyq-live-view", daemon=True)
    live.start()
    thread.start()
    try:
        yield True
    finally:
        stop.set()
        thread.join()
        refresh("")  # the final state stays on the screen
        live.stop()
        if "store" in reader:
            reader["store"].close()
