"""A script that calls ``run_study`` with the process pool but has no ``__main__`` guard.

The pool starts its workers with ``forkserver``, whose children import the main script before
they take work; a module-level ``run_study`` would run the study again in each of them. It
must be refused there with the fix in the message, and the guarded script must run as usual.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from embedded_support import cli_env, explain, factor, store_counts, write_study

RUNS = 2 * 2

CALL = (
    "run = run_study({study!r}, jobs=2, db={db!r}, output_dir={out!r}, show_progress=False)\n"
    "print('RAN', run.executed, run.succeeded, flush=True)\n"
)


def _script(path: Path, study: Path, db: str, out: Path, *, guarded: bool) -> Path:
    """A user script calling run_study at module level, or under the ``__main__`` guard."""
    call = CALL.format(study=str(study), db=db, out=str(out))
    if guarded:
        call = 'if __name__ == "__main__":\n' + "".join(
            f"    {line}\n" for line in call.splitlines()
        )
    path.write_text("from orchestrator.api import run_study\n\n" + call, encoding="utf-8")
    return path


def _run(script: Path, calls: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=script.parent,
        env=cli_env(calls),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.timeout(120)
def test_run_study_refuses_a_reimported_main_and_runs_under_the_guard(tmp_path: Path) -> None:
    """Given a study of four counted runs and a script calling run_study(jobs=2),
    when the script has no __main__ guard,
    then the pool child importing it refuses with the fix named, the script exits nonzero,
    no child runs or exports the study (no second RAN line, no agent call, no artifacts);
    and when the same script has the guard, it runs every run exactly once."""
    study = write_study(
        tmp_path / "study.yaml",
        {
            "study_id": "main-guard",
            "title": "Main guard",
            "factors": [factor("arm", "a", "b")],
            "agent_specs": ["counted"],
            "problem_ids": ["noop"],
            "design_spec": {"kind": "full_factorial"},
            "run_budget": {"replicates": 2},
            "bindings": {"agents": {"counted": "embedded_agents:counted"}},
        },
    )

    bare_dir = tmp_path / "bare"
    bare_dir.mkdir()
    bare_db = f"sqlite:///{bare_dir / 'studyq.db'}"
    bare_calls = bare_dir / "calls.txt"
    bare = _run(
        _script(bare_dir / "script.py", study, bare_db, bare_dir / "out", guarded=False),
        bare_calls,
    )

    assert bare.returncode != 0, explain(bare)
    assert "StudyError" in bare.stderr, explain(bare)
    assert 'put the call under `if __name__ == "__main__":`' in bare.stderr, explain(bare)
    assert "RAN" not in bare.stdout, explain(bare)
    assert not bare_calls.exists(), bare_calls.read_text(encoding="ascii")
    assert not (bare_dir / "out").exists()
    assert sum(store_counts(bare_db, "main-guard").values()) == RUNS

    guarded_dir = tmp_path / "guarded"
    guarded_dir.mkdir()
    guarded_db = f"sqlite:///{guarded_dir / 'studyq.db'}"
    guarded_calls = guarded_dir / "calls.txt"
    guarded = _run(
        _script(guarded_dir / "script.py", study, guarded_db, guarded_dir / "out", guarded=True),
        guarded_calls,
    )

    assert guarded.returncode == 0, explain(guarded)
    assert guarded.stdout.splitlines() == [f"RAN {RUNS} {RUNS}"], explain(guarded)
    assert "StudyError" not in guarded.stderr, explain(guarded)
    lines = guarded_calls.read_text(encoding="ascii").splitlines()
    assert len(lines) == len(set(lines)) == RUNS
    assert store_counts(guarded_db, "main-guard") == {"success": RUNS}
    assert (guarded_dir / "out" / "manifest.json").exists()
