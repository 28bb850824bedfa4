"""Finding (or building) a Python 3.12 with design-research-experiments 0.4.0 for the benchmarks.

Shared by bench/plan.py and bench/embedded.py; the tests build the same venv
(tests/test_compat_upstream.py), so a machine that ran them has it already.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["UPSTREAM_VENV", "clean_env", "find_upstream_python"]

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_VENV = REPO_ROOT / ".cache" / "upstream-venv"
UPSTREAM_REQUIREMENT = "design-research-experiments==0.4.0"


def clean_env(*, keep_pythonpath: bool = False) -> dict[str, str]:
    """The environment without anything that would make a child import the wrong packages."""
    hidden = {"PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    if not keep_pythonpath:
        hidden.add("PYTHONPATH")
    return {key: value for key, value in os.environ.items() if key not in hidden}


def _has_upstream(python: str) -> bool:
    probe = "import importlib.metadata as m; print(m.version('design-research-experiments'))"
    try:
        done = subprocess.run(
            [python, "-c", probe],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=clean_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip() == "0.4.0"


def _python312_candidates() -> Iterator[str]:
    explicit = os.environ.get("STUDYQ_PY312")
    if explicit:
        yield explicit
    on_path = shutil.which("python3.12")
    if on_path:
        yield on_path
    pattern = str(Path.home() / ".pyenv" / "versions" / "3.12*" / "bin" / "python3.12")
    yield from sorted(glob.glob(pattern), reverse=True)
    yield from ("/usr/local/bin/python3.12", "/usr/bin/python3.12")


def _build_upstream_venv() -> str | None:
    version = "import sys; print('%d.%d' % sys.version_info[:2])"
    for candidate in _python312_candidates():
        try:
            done = subprocess.run(
                [candidate, "-c", version],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
                env=clean_env(),
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode != 0 or done.stdout.strip() != "3.12":
            continue
        print(f"building {UPSTREAM_VENV} with {candidate} ...", file=sys.stderr)
        python = UPSTREAM_VENV / "bin" / "python"
        try:
            subprocess.run(
                [candidate, "-m", "venv", str(UPSTREAM_VENV)],
                check=True,
                env=clean_env(),
                timeout=300,
            )
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", UPSTREAM_REQUIREMENT],
                check=True,
                env=clean_env(),
                timeout=600,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return str(python) if _has_upstream(str(python)) else None
    return None


def find_upstream_python(*, build: bool) -> str | None:
    """An interpreter with design-research-experiments 0.4.0, or None."""
    candidates = [
        os.environ.get("STUDYQ_UPSTREAM_PYTHON", ""),
        str(UPSTREAM_VENV / "bin" / "python"),
        "/tmp/dre/bin/python",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists() and _has_upstream(candidate):
            return candidate
    return _build_upstream_venv() if build else None
