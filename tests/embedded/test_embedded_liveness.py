"""Whether an embedded claim's owner is alive: zombies, reused PIDs, the fallback, journals.

Real processes throughout: a forked child that exits and is not reaped is a real zombie, a
``sleep`` child is a real live process. Linux only where ``/proc`` is what is being tested.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from embedded_support import wait_until

from orchestrator.executors.embedded_owner import (
    EmbeddedOwner,
    is_dead_embedded_owner,
    process_alive,
    process_start,
)
from orchestrator.executors.start_journal import StartJournal, StartLog

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def zombie() -> Iterator[int]:
    """A child that has exited and that nobody has reaped yet (state ``Z``)."""
    pid = os.fork()
    if pid == 0:  # the child: leave at once, without running any of pytest's teardown
        os._exit(0)
    try:
        assert wait_until(lambda: _state(pid) == "Z", timeout=5), "the child never became a zombie"
        yield pid
    finally:
        os.waitpid(pid, 0)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live child process."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield child
    finally:
        child.kill()
        child.wait(timeout=10)


@linux_only
def test_an_unreaped_zombie_is_seen_as_dead_although_kill_0_succeeds(zombie: int) -> None:
    """Given a child that exited and was not reaped (what a `kill -9`ed `studyq run` is until
    its parent waits for it),
    when its liveness is asked,
    then it is dead, and so is an embedded owner named after it, although `kill(pid, 0)`
    still succeeds on it (the check that was fooled)."""
    os.kill(zombie, 0)  # no error: this is why kill(pid, 0) alone cannot tell

    assert process_alive(zombie) is False
    owner = EmbeddedOwner(socket.gethostname(), zombie, process_start(zombie))
    assert is_dead_embedded_owner(str(owner)) is True


@linux_only
def test_a_live_process_is_alive_unless_its_pid_now_belongs_to_a_later_process(
    sleeper: subprocess.Popen[bytes],
) -> None:
    """Given a live process and the start time it has in /proc,
    when an owner names it with that start time, or with another one (the PID reused by a
    process that started later),
    then the first is alive and the second is dead."""
    start = process_start(sleeper.pid)
    assert start is not None

    assert process_alive(sleeper.pid, start) is True
    assert process_alive(sleeper.pid) is True  # an older owner name without a start time
    assert process_alive(sleeper.pid, start - 1) is False
    host = socket.gethostname()
    assert is_dead_embedded_owner(str(EmbeddedOwner(host, sleeper.pid, start))) is False
    assert is_dead_embedded_owner(str(EmbeddedOwner(host, sleeper.pid, start - 1))) is True
    assert is_dead_embedded_owner(f"embedded:{host}:{sleeper.pid}") is False


def test_without_proc_the_fallback_asks_the_kernel_and_takes_a_zombie_for_alive(
    tmp_path: Path, zombie: int
) -> None:
    """Given no /proc entries (another OS; here an empty folder stands in for /proc),
    when liveness is asked,
    then `kill(pid, 0)` decides: a live process is alive, a zombie too (the documented
    limitation of the fallback), and a reaped PID is dead."""
    no_proc = tmp_path / "proc"
    no_proc.mkdir()

    assert process_alive(os.getpid(), proc=no_proc) is True
    assert process_alive(zombie, proc=no_proc) is True
    assert process_start(os.getpid(), proc=no_proc) is None


def test_a_reaped_pid_is_dead() -> None:
    """Given a child that exited and was reaped,
    when its liveness is asked,
    then it is dead, with and without /proc."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)

    assert process_alive(child.pid) is False
    assert process_alive(child.pid, proc=Path("/nonexistent-proc")) is False


def test_owner_names_round_trip_and_only_this_hosts_embedded_owners_can_be_dead() -> None:
    """Given owner names of this process, of an older version, of another host and of a
    distributed worker,
    when they are parsed and judged,
    then this process's name round-trips with its start time, an old three-part name still
    parses, and names of other hosts or other kinds are never dead (their leases decide)."""
    me = EmbeddedOwner.current()
    assert EmbeddedOwner.parse(str(me)) == me
    assert me.pid == os.getpid()
    assert EmbeddedOwner.parse("embedded:box:12") == EmbeddedOwner("box", 12, None)
    for foreign in ("embedded:another-host:1", "celery@box:1", "embedded:box", "embedded:h:x"):
        assert is_dead_embedded_owner(foreign) is False, foreign
    # Our own PID at start-up is a dead predecessor's (a restarted container): see
    # test_claims_left_under_this_process_name_by_a_dead_predecessor_run_again.
    assert is_dead_embedded_owner(str(me)) is True


def test_the_start_journal_keeps_what_every_process_appended(tmp_path: Path) -> None:
    """Given a journal that two processes append to (this one and a child),
    when it is read,
    then it has every (index, attempt) either wrote, ignores a torn line, and reads as
    None once removed (a take-back then charges every claim)."""
    journal = StartJournal(tmp_path / "j.starts")
    journal.create()
    log = StartLog(journal.path)
    log.started(3, 1)
    code = (
        "import sys; from orchestrator.executors.start_journal import StartLog; "
        "log = StartLog(sys.argv[1]); [log.started(i, 2) for i in range(100)]"
    )
    subprocess.run([sys.executable, "-c", code, str(journal.path)], check=True, timeout=60)
    log.started(4, 1)
    log.close()
    with journal.path.open("a") as handle:
        handle.write("17")  # a line cut short

    assert journal.read() == {(3, 1), (4, 1), *((i, 2) for i in range(100))}
    journal.remove()
    assert journal.read() is None


def test_stale_journals_of_gone_processes_are_removed_and_live_ones_kept(
    sleeper: subprocess.Popen[bytes],
) -> None:
    """Given journals of one sweep (store and study) kept by this process, by a live process
    and by a process that is gone, and journals of the gone process for another study and
    for the same study in another store,
    when stale journals are removed for the sweep,
    then only the gone process's journal of that sweep is deleted."""
    host = socket.gethostname()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    live = EmbeddedOwner(host, sleeper.pid, process_start(sleeper.pid))
    dead = EmbeddedOwner(host, gone.pid, 1)
    study = f"stale-{time.monotonic_ns()}"
    journals = {
        name: StartJournal.for_owner(owner, store, study_id)
        for name, owner, store, study_id in (
            ("mine", EmbeddedOwner.current(), "db", study),
            ("live", live, "db", study),
            ("dead", dead, "db", study),
            ("other-study", dead, "db", f"{study}-other"),
            ("other-store", dead, "another-db", study),
        )
    }
    try:
        for journal in journals.values():
            assert journal is not None
            journal.create()

        assert journals["mine"] is not None
        assert journals["mine"].remove_stale() == 1

        left = {name for name, journal in journals.items() if journal and journal.path.exists()}
        assert left == {"mine", "live", "other-study", "other-store"}
    finally:
        for journal in journals.values():
            if journal is not None:
                journal.remove()
