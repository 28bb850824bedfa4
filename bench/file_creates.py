"""Benchmark: what one small file's creation costs in a directory, fresh and right after a
deletion of as many files. Results and analysis: docs/embedded.md, "What the disk was".

Run from the repository root::

    .venv/bin/python bench/file_creates.py                      # $TMPDIR (or /tmp) and /dev/shm
    .venv/bin/python bench/file_creates.py --files 10000 --rounds 4 /tmp /dev/shm

Why it exists: an export writes three files and two directories per run, and on an ext4
file system without a journal each create steps over every inode freed in the last 60 to
300 seconds (the kernel's ``recently_deleted`` check). Each round here creates ``--files``
files, deletes them, creates as many again and deletes those: rounds after the first show
what the earlier deletions cost the next creates. On tmpfs, or on a journalled file system,
the rounds stay flat. Nothing is asserted; the figures are printed per round, in µs per
create, wall time and system CPU time.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

PAYLOAD = "x" * 500  # about one evidence record


def _create(folder: Path, files: int) -> tuple[float, float]:
    """Wall and system-CPU microseconds per created file."""
    folder.mkdir()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    started = time.perf_counter()
    for index in range(files):
        with open(folder / f"f{index}", "w", encoding="utf-8") as handle:
            handle.write(PAYLOAD)
    wall = time.perf_counter() - started
    system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
    return wall / files * 1e6, system / files * 1e6


def measure(root: Path, *, files: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="studyq-bench-creates-", dir=root) as base:
        for number in range(1, rounds + 1):
            fresh = _create(Path(base) / f"a{number}", files)
            shutil.rmtree(Path(base) / f"a{number}")
            again = _create(Path(base) / f"b{number}", files)
            shutil.rmtree(Path(base) / f"b{number}")
            print(
                f"| {root} | {number} | {fresh[0]:.0f} / {fresh[1]:.0f} "
                f"| {again[0]:.0f} / {again[1]:.0f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="example: .venv/bin/python bench/file_creates.py --files 10000 /tmp /dev/shm",
    )
    parser.add_argument("roots", nargs="*", type=Path, help="directories to create files in")
    parser.add_argument("--files", type=int, default=10_000, help="files per batch")
    parser.add_argument("--rounds", type=int, default=3, help="create-delete rounds per root")
    args = parser.parse_args()
    roots = args.roots or [Path(tempfile.gettempdir()), Path("/dev/shm")]
    print("| directory | round | µs per create, fresh (wall / sys) | right after a deletion |")
    print("|---|---:|---:|---:|")
    for root in roots:
        if root.is_dir() and os.access(root, os.W_OK):
            measure(root, files=args.files, rounds=args.rounds)
        else:
            print(f"| {root} | skipped: not a writable directory | | |")


if __name__ == "__main__":
    main()
