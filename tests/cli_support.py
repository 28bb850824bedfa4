"""What the bad-input CLI tests share: a clean ``STUDYQ_*`` environment, ``main(argv)`` with
its output, and the check that stderr is one clear line with a fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.cli import main


@pytest.fixture(autouse=True)
def _no_studyq_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test sets exactly the variables it is about, and runs in its own folder."""
    for name in [name for name in os.environ if name.startswith("STUDYQ_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_clear_line(err: str, *parts: str) -> str:
    """stderr is exactly one line, with every part and a fix, and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for part in parts:
        assert part in lines[0], f"{part!r} missing from:\n{err}"
    assert "Fix:" in lines[0], err
    return lines[0]
