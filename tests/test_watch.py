"""``studyq status STUDY --watch`` and ``studyq run`` on a terminal: the live view (issue 13).

Given real embedded sweeps of the demo ``sleep`` and ``flaky`` agents into a SQLite store
under ``tmp_path``, when a researcher watches them, then: a snapshot renders a bar per
condition, agent and problem, the rate and ETA (``done`` once nothing is left, at the
sweep's own rate), failures by error class with the latest message, cost and budget, and
the workers seen in the last minute; in a pseudo-terminal the view redraws as the sweep
moves and Ctrl-C exits 0 with the cursor restored; with stdout not a terminal it prints one
plain line per refresh and stops when the study is done; ``studyq run`` in a terminal shows
the same view; bad input (no study id, an unknown one, a missing store file, a bad
interval) exits 2 with one line and a fix, and a database that is down exits 3.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from _services import ServiceSupplier
from cli_support import _no_studyq_environment, one_clear_line, run_main  # noqa: F401
from rich.console import Console

from orchestrator.cli import EXIT_CONNECT, EXIT_OK, EXIT_USAGE
from orchestrator.embedded import register, run_embedded
from orchestrator.store import ResultStore, pausing, upgrade
from orchestrator.store.engine import transaction
from orchestrator.store.live import FailureClass, WorkerSeen
from orchestrator.study.plan import prepare
from orchestrator.watch import Snapshot, plain_line, read_snapshot, render

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
SHOW_CURSOR = b"\x1b[?25h"
RUNS = 60


def _write_study(folder: Path, study_id: str, *, replicates: int, sleep_s: float) -> Path:
    """Two conditions (a short and a slightly longer sleep) of the demo ``sleep`` agent."""
    study = {
        "study_id": study_id,
        "title": "Watching a sweep",
        "factors": [
            {
                "name": "sleep_s",
                "levels": [
                    {"name": "short", "value": sleep_s},
                    {"name": "longer", "value": round(sleep_s * 1.2, 3)},
                ],
            }
        ],
        "agent_specs": ["sleep"],
        "problem_ids": ["noop"],
        "run_budget": {"replicates": replicates},
    }
    path = folder / f"{study_id}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def _registered(study: Path, url: str) -> None:
    """Register the study up front, so a watcher started with the sweep finds it."""
    with ResultStore.open(url) as store:
        register(store, prepare(study))


def _studyq() -> list[str]:
    script = Path(sys.executable).parent / "studyq"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator.cli"]


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("STUDYQ_")}
    env.update(PYTHONUNBUFFERED="1", TERM="xterm-256color", COLUMNS="120", LINES="80")
    env.pop("NO_COLOR", None)
    return env


def _controlling_terminal() -> None:
    """In the child, after setsid: make the pty (its stdin) the controlling terminal, so a
    Ctrl-C typed into it is a SIGINT to the child, as in a real terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class _Terminal:
    """A command running in a pseudo-terminal of 120 x 80, and what it drew so far."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 80, 120, 0, 0))
        self.child = subprocess.Popen(
            argv,
            cwd=cwd,
            env=_env(),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_controlling_terminal,
        )
        os.close(slave)
        self.fd = master
        self.screen = bytearray()

    def read(self, seconds: float) -> bytes:
        """What the command wrote in the next ``seconds`` (less if it exits)."""
        start = len(self.screen)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            self.screen.extend(chunk)
        return bytes(self.screen[start:])

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.child.poll() is None and time.monotonic() < deadline:
            self.read(0.1)
        self.read(0.2)
        return self.child.wait(timeout=1)

    def close(self) -> None:
        if self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGKILL)
            self.child.wait()
        os.close(self.fd)


def _text(raw: bytes) -> str:
    return ANSI.sub(b"", raw).decode("utf-8", "replace")


def _finished_counts(raw: bytes, total: int) -> list[int]:
    return [int(n) for n in re.findall(rf"(\d+)/{total} finished", _text(raw))]


def _start_sweep(study: Path, url: str, cwd: Path) -> subprocess.Popen[str]:
    argv = [*_studyq(), "run", str(study), "--db", url, "--jobs", "2", "--no-export"]
    return subprocess.Popen(
        argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


# -- rendering a snapshot ------------------------------------------------------------------


def _snapshot(**changes: Any) -> Snapshot:
    now = datetime(2026, 12, 7, 1, 0, 0, tzinfo=UTC)
    values: dict[str, Any] = {
        "study_id": "watch-study",
        "title": "Watching a sweep",
        "run_count": 20,
        "counts": {
            "planned": 2,
            "queued": 4,
            "running": 2,
            "success": 9,
            "failed": 3,
            "cancelled": 0,
        },
        "by": {
            "condition": {
                "sleep_s=0.05": {"success": 6, "failed": 1, "running": 1, "queued": 2},
                "sleep_s=0.08": {
                    "success": 3,
                    "failed": 2,
                    "running": 1,
                    "planned": 2,
                    "queued": 2,
                },
            },
            "agent": {"sleep": {"success": 9, "failed": 3, "running": 2, "queued": 6}},
            "problem": {"noop": {"success": 9, "failed": 3, "running": 2, "queued": 6}},
        },
        "rate_per_s": 2.5,
        "cost_usd": 1.25,
        "budget_usd": None,
        "failures": [
            FailureClass("timeout", None, 2, "run exceeded 1.0 s", "run-aaaaaaaaaaaa", now),
            FailureClass(
                "error",
                "FlakyAgentError",
                1,
                "flaky agent failed [on purpose]",
                "run-bbbbbbbbbbbb",
                now,
            ),
        ],
        "workers": [
            WorkerSeen("celery@node-1", 2, now),
            WorkerSeen("celery@node-2", 0, now - timedelta(seconds=40)),
        ],
        "taken_at": now,
    }
    values.update(changes)
    return Snapshot(**values)


def _rendered(snapshot: Snapshot) -> str:
    out = io.StringIO()
    Console(file=out, width=120, color_system=None, force_terminal=False).print(render(snapshot))
    return out.getvalue()


def test_a_snapshot_renders_bars_rate_eta_failures_cost_and_workers() -> None:
    # Given a sweep 12 of 20 runs in, finishing 2.5 runs/s, with two error classes
    snapshot = _snapshot()
    # When it is rendered 120 columns wide
    text = _rendered(snapshot)
    # Then the overall line, a bar per condition, agent and problem, rate and ETA (8 left at
    # 2.5/s), failures with their latest message and run, cost, and the workers are there
    assert "12/20 finished" in text
    assert "9 success  3 failed  0 cancelled  2 running  6 waiting" in text
    for group in ("by condition", "by agent", "by problem"):
        assert group in text
    for row in ("sleep_s=0.05", "sleep_s=0.08", "sleep", "noop"):
        assert re.search(rf"{re.escape(row)}\s+━+.*\d+/\d+", text), f"no bar for {row}:\n{text}"
    assert re.search(r"sleep_s=0\.05\s+\S+\s+7/10", text), text
    assert "rate 2.5 runs/s (last 60 s)" in text
    assert "ETA 0m03s" in text
    assert "timeout" in text and "run exceeded 1.0 s [run-aaaaaaaaaaaa]" in text
    assert "error (FlakyAgentError)" in text
    assert "flaky agent failed [on purpose] [run-bbbbbbbbbbbb]" in text  # not taken as markup
    assert "cost $1.25 (budget: none set)" in text
    assert "workers seen in the last minute: 2: celery@node-1 (2 running, 0 s ago)" in text
    assert "celery@node-2 (0 running, 40 s ago)" in text
    assert "Ctrl-C quits" in text
    # And the plain line says the same in one line
    line = plain_line(snapshot)
    assert "\n" not in line
    assert "watch-study: 12/20 finished (9 success, 3 failed, 0 cancelled), 2 running" in line
    assert "rate 2.5 runs/s; ETA 0m03s; cost $1.25 (budget: none set)" in line


def test_a_done_snapshot_says_done_and_a_budget_shows_spent_of_limit() -> None:
    # Given a finished study with a cost limit
    snapshot = _snapshot(
        counts={
            "success": 18,
            "failed": 2,
            "cancelled": 0,
            "planned": 0,
            "queued": 0,
            "running": 0,
        },
        rate_per_s=4.0,
        budget_usd=10.0,
        failures=[],
        workers=[],
    )
    # When it is rendered
    text = _rendered(snapshot)
    # Then there is no ETA but "done", the rate is the whole sweep's, and the budget is
    # spent / limit with what is left
    assert snapshot.eta_s is None
    assert "ETA" not in text and "done" in text
    assert "rate 4.0 runs/s (whole sweep)" in text
    assert "cost $1.25 of $10.00 ($8.75 left)" in text
    assert "failures: none" in text
    assert "workers seen in the last minute: none" in text
    assert plain_line(snapshot).endswith("rate 4.0 runs/s; done; cost $1.25 of $10.00 ($8.75 left)")


@pytest.mark.parametrize("height", [24, 40])
def test_the_view_fits_a_short_terminal(height: int) -> None:
    # Given a study of 25 conditions, 6 agents and 2 problems
    by = {
        "condition": {f"cond-{i:02d}": {"success": i, "queued": 3} for i in range(25)},
        "agent": {f"agent-{i}": {"success": 2, "running": 1} for i in range(6)},
        "problem": {"p1": {"success": 1}, "p2": {"success": 1}},
    }
    # When it is rendered for a terminal of `height` lines
    out = io.StringIO()
    console = Console(file=out, width=120, height=height, color_system=None)
    console.print(render(_snapshot(by=by), height=height))
    text = out.getvalue()
    # Then it fits, the breakdowns cut to "... N more", failures and workers still shown
    assert len(text.splitlines()) < height, text
    assert re.search(r"\.\.\. \d+ more", text) and "by problem" in text
    assert "failures by error class" in text and "workers seen in the last minute" in text


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def store_url(
    request: pytest.FixtureRequest, tmp_path: Path, services: ServiceSupplier
) -> Iterator[str]:
    """A fresh store on each backend (the window query and the lease times on both)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    with services.pg_database("watch", migrate=True) as url:
        yield url


def test_a_snapshot_read_from_the_store_has_the_latest_failure_and_the_worker(
    tmp_path: Path, store_url: str
) -> None:
    # Given a finished embedded sweep where the flaky agent failed on every run of one level
    study = {
        "study_id": "watch-failures",
        "title": "Failures",
        "factors": [
            {
                "name": "fail",
                "levels": [{"name": "ok", "value": False}, {"name": "broken", "value": True}],
            },
        ],
        "agent_specs": ["flaky"],
        "problem_ids": ["noop"],
        "run_budget": {"replicates": 3},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    url = store_url
    run_embedded(path, db=url, jobs=1, export=False, show_progress=False)
    # When a snapshot is read
    with ResultStore.open(url) as store:
        info = store.find_study("watch-failures")
        assert info is not None
        snapshot = read_snapshot(store, info, lease_s=60.0)
        failed = [run for run in store.iter_runs("watch-failures") if run.status == "failed"]
    # Then the 3 failures are one class whose latest message is the last failed run's
    latest = max(failed, key=lambda run: (run.ended_at, run.index))
    assert [(f.error_type, f.count) for f in snapshot.failures] == [("FlakyAgentError", 3)]
    assert snapshot.failures[0].latest_run_id == latest.run_id
    assert snapshot.failures[0].latest_message == latest.error_message
    # And conditions are named by their labels, the sweep is done at its own rate, and the
    # embedded coordinator is the worker seen in the last minute
    assert sorted(snapshot.by["condition"]) == ["fail=False", "fail=True"]
    assert snapshot.done and snapshot.rate_per_s and snapshot.eta_s is None
    assert [worker.worker.split(":")[0] for worker in snapshot.workers] == ["embedded"]
    assert snapshot.workers[0].running == 0


def test_a_worker_holding_a_run_is_seen_from_its_lease(store_url: str, tmp_path: Path) -> None:
    # Given a registered study and a worker that claimed one run and heartbeat it
    study = _write_study(tmp_path, "watch-lease", replicates=2, sleep_s=0.01)
    _registered(study, store_url)
    with ResultStore.open(store_url) as store:
        claim = store.claim_run(
            "watch-lease", 0, worker="celery@node-a", lease_s=120.0, allow_planned=True
        )
        assert claim is not None and store.heartbeat(claim, 120.0)
        info = store.find_study("watch-lease")
        assert info is not None
        # When a snapshot is read with the workers' lease length
        snapshot = read_snapshot(store, info, lease_s=120.0)
    # Then the worker is seen now, holding one run, and the sweep is not done
    assert [(w.worker, w.running) for w in snapshot.workers] == [("celery@node-a", 1)]
    assert snapshot.taken_at is not None and not snapshot.done
    assert snapshot.counts["running"] == 1 and snapshot.remaining == 4
    assert "celery@node-a (1 running, 0 s ago)" in _rendered(snapshot)


def test_a_snapshot_shows_the_effective_budget_and_a_pause(store_url: str, tmp_path: Path) -> None:
    # Given a study whose file sets a $5 and 1,000-token budget
    path = _write_study(tmp_path, "watch-budget", replicates=1, sleep_s=0.01)
    study = yaml.safe_load(path.read_text(encoding="utf-8"))
    study["execution"] = {"max_cost_usd": 5.0, "max_tokens": 1000}
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    _registered(path, store_url)
    with ResultStore.open(store_url) as store:
        info = store.find_study("watch-budget")
        assert info is not None
        # When it is read as registered
        before = read_snapshot(store, info, lease_s=60.0)
        # And after `studyq budget` raised the cost limit and a budget paused dispatch
        with transaction(store.engine) as connection:
            pausing.set_budget_overrides(
                connection, "watch-budget", max_cost_usd=8.0, max_tokens=None
            )
            pausing.pause(connection, "watch-budget", pausing.BUDGET, {})
        after = read_snapshot(store, info, lease_s=60.0)
    # Then the view shows the file's limits, then the raised one and why nothing is claimed
    assert (before.budget_usd, before.budget_tokens, before.paused) == (5.0, 1000, None)
    assert "cost $0.00 of $5.00 ($5.00 left), tokens 0 of 1,000 (1,000 left)" in plain_line(before)
    assert (after.budget_usd, after.budget_tokens) == (8.0, 1000)
    assert after.paused is not None and "a budget is spent" in after.paused
    assert "cost $0.00 of $8.00 ($8.00 left)" in _rendered(after)
    assert "dispatch paused since" in _rendered(after) and after.paused in plain_line(after)


# -- in a terminal, and not ------------------------------------------------------------------


def test_watch_in_a_terminal_moves_with_a_real_sweep_and_ctrl_c_exits_0(tmp_path: Path) -> None:
    # Given a registered study of 60 runs of 0.12-0.14 s and its watch in a pseudo-terminal
    study = _write_study(tmp_path, "watch-pty", replicates=RUNS // 2, sleep_s=0.12)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    _registered(study, url)
    terminal = _Terminal(
        [*_studyq(), "status", "watch-pty", "--watch", "--interval", "0.5", "--db", url],
        tmp_path,
    )
    sweep: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        drawn: list[int] = []
        while not drawn and time.monotonic() < deadline:
            drawn = _finished_counts(terminal.read(0.5), RUNS)
        assert drawn == [0] * len(drawn), f"no view:\n{_text(bytes(terminal.screen))[-3000:]}"
        # When the study is swept with --jobs 2 (~4 s) while the view runs
        sweep = _start_sweep(study, url, tmp_path)
        first: list[int] = []
        while not (first and first[-1] > 0) and time.monotonic() < deadline:
            first = _finished_counts(terminal.read(0.5), RUNS)
        assert first and 0 < first[-1] < RUNS, (first, "the sweep did not show mid-way")
        moved: list[int] = []
        while time.monotonic() < deadline:
            moved = _finished_counts(terminal.read(1.0), RUNS)  # a second later (and on)
            if moved and moved[-1] > first[-1]:
                break
        # Then the finished count moved between two reads a second apart
        assert moved and moved[-1] > first[-1], (first, moved)
        screen = _text(bytes(terminal.screen))
        assert "by condition" in screen and "sleep_s=0.12" in screen and "by agent" in screen
        assert "━" in screen
        # And Ctrl-C typed into the terminal exits 0 with the cursor shown again
        os.write(terminal.fd, b"\x03")
        code = terminal.wait(timeout=10)
        assert code == EXIT_OK, _text(bytes(terminal.screen))[-3000:]
        assert SHOW_CURSOR in bytes(terminal.screen)[-200:]
        assert "Traceback" not in _text(bytes(terminal.screen))
    finally:
        terminal.close()
        err = sweep.communicate(timeout=60)[1] if sweep is not None else ""
    assert sweep is not None and sweep.returncode == EXIT_OK, err


def test_watch_without_a_terminal_prints_plain_lines_and_ends_with_the_study(
    tmp_path: Path,
) -> None:
    # Given a registered study and its watch with stdout a pipe (so no live view)
    study = _write_study(tmp_path, "watch-plain", replicates=15, sleep_s=0.1)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    _registered(study, url)
    argv = [*_studyq(), "status", "watch-plain", "--watch", "--interval", "0.3", "--db", url]
    errors = tmp_path / "watch.err"
    with errors.open("w") as stderr:
        watch = subprocess.Popen(
            argv, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    lines = _Lines(watch)
    try:
        lines.wait_for("0/30 finished", 30)
        # When the study is swept in the background (its stdout a pipe too)
        sweep = _start_sweep(study, url, tmp_path)
        out, err = sweep.communicate(timeout=60)
        code = watch.wait(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
        text = lines.text()
    # Then the watch ended by itself (exit 0) once nothing was left, after plain lines only
    assert code == EXIT_OK, errors.read_text()
    assert "\x1b" not in text
    pattern = re.compile(
        r"^\d\d:\d\d:\d\d watch-plain: \d+/30 finished \(\d+ success, \d+ failed, \d+ "
        r"cancelled\), \d+ running, \d+ waiting; rate .+; (ETA \S+|done); cost \$0\.00 "
        r"\(budget: none set\)$"
    )
    rows = text.splitlines()
    assert len(rows) >= 2, text
    for line in rows:
        assert pattern.match(line), line
    assert "30/30 finished (30 success" in rows[-1] and "; done;" in rows[-1]
    assert all("; done;" not in line for line in rows[:-1])
    # And the sweep itself, not on a terminal either, drew no live view
    assert sweep.returncode == EXIT_OK, err
    assert "workers seen in the last minute" not in out + err and "/30 finished" not in out


def test_run_in_a_terminal_shows_the_live_view(tmp_path: Path) -> None:
    # Given a small study
    study = _write_study(tmp_path, "watch-run", replicates=10, sleep_s=0.05)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    # When `studyq run` runs in a pseudo-terminal
    terminal = _Terminal(
        [*_studyq(), "run", str(study), "--db", url, "--jobs", "2", "--no-export"], tmp_path
    )
    try:
        code = terminal.wait(timeout=60)
    finally:
        terminal.close()
    screen = _text(bytes(terminal.screen))
    # Then it drew the watch view (ending at 20/20) instead of a tqdm bar, then its summary
    assert code == EXIT_OK, screen[-3000:]
    assert "20/20 finished" in screen and "workers seen in the last minute" in screen, screen
    assert "run/s" not in screen  # tqdm's unit
    assert "executed 20 runs now" in screen
    assert SHOW_CURSOR in bytes(terminal.screen)


@pytest.mark.integration
def test_watch_survives_a_database_outage_and_ends_with_the_study(tmp_path: Path) -> None:
    # Given a study of 2 runs registered in a PostgreSQL server of the test's own
    from faults.fault_services import OwnPostgres

    server = OwnPostgres()
    errors = tmp_path / "watch.err"
    try:
        url = server.url()
        upgrade(url)
        study = _write_study(tmp_path, "watch-outage", replicates=1, sleep_s=0.01)
        _registered(study, url)
        # When a watch (stdout a pipe) runs while the server stops, then starts again
        argv = [*_studyq(), "status", "watch-outage", "--watch", "--interval", "0.3"]
        with errors.open("w") as stderr:
            watch = subprocess.Popen(
                [*argv, "--db", url], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                stderr=stderr, text=True,
            )  # fmt: skip
        lines = _Lines(watch)
        try:
            lines.wait_for("0/2 finished", 20)
            server.stop()
            lines.wait_for("store unavailable, retrying", 20)
            server.start()
            lines.wait_for("0/2 finished", 20, after=lines.count())
            # And the study's runs are executed after the outage
            run_embedded(study, db=url, jobs=1, export=False, show_progress=False)
            code = watch.wait(timeout=20)
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
            text = lines.text()
    finally:
        server.close()
    # Then it kept watching through the outage and ended by itself when the study did
    assert code == EXIT_OK, errors.read_text()
    assert "Traceback" not in text + errors.read_text()
    assert "2/2 finished (2 success" in text.splitlines()[-1] and "; done;" in text


class _Lines:
    """The stdout lines of a running child, read by a thread as they come."""

    def __init__(self, child: subprocess.Popen[str]) -> None:
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, args=(child,), daemon=True)
        self._reader.start()

    def _read(self, child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None
        with child.stdout:
            for line in child.stdout:
                self._lines.append(line.rstrip("\n"))

    def count(self) -> int:
        return len(self._lines)

    def text(self) -> str:
        self._reader.join(timeout=5)
        return "\n".join(self._lines)

    def wait_for(self, part: str, timeout: float, *, after: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(part in line for line in self._lines[after:]):
                return
            time.sleep(0.05)
        raise AssertionError(f"no line with {part!r} in {timeout} s:\n" + "\n".join(self._lines))


# -- bad input -------------------------------------------------------------------------------


def test_watch_bad_input_exits_2_with_a_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a store holding one study
    study = _write_study(tmp_path, "watch-known", replicates=1, sleep_s=0.01)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    _registered(study, url)
    # When --watch has no study id, then exit 2 naming the flag and the fix
    code, out, err = run_main(["status", "--watch", "--db", url], capsys)
    assert code == EXIT_USAGE and not out
    one_clear_line(err, "--watch", "studyq status STUDY_ID --watch")
    # When the study id is unknown, then exit 2 naming the studies there
    code, out, err = run_main(["status", "nope", "--watch", "--db", url], capsys)
    assert code == EXIT_USAGE and not out
    one_clear_line(err, "'nope'", "watch-known")
    # When the interval is not a positive number of seconds, then exit 2
    code, out, err = run_main(["status", "watch-known", "--watch", "--interval", "0"], capsys)
    assert code == EXIT_USAGE
    one_clear_line(err, "--interval")
    # When --db names a SQLite file that does not exist, then exit 2 and no file is created
    missing = tmp_path / "elsewhere" / "typo.db"
    code, out, err = run_main(["status", "x", "--watch", "--db", f"sqlite:///{missing}"], capsys)
    assert code == EXIT_USAGE
    one_clear_line(err, str(missing))
    assert not missing.exists() and not missing.parent.exists()


def test_watch_with_the_database_down_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    # Given a PostgreSQL URL nothing listens on
    url = "postgresql://postgres@127.0.0.1:9/studyq"
    # When the watch starts, then it exits 3 with one message and no traceback
    code, out, err = run_main(["status", "any-study", "--watch", "--db", url], capsys)
    assert code == EXIT_CONNECT, err
    assert not out and "Traceback" not in err and err.startswith("studyq: ")
