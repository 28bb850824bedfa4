"""A researcher's first hour, played end to end: a fresh virtual environment with studyq
installed as the README says, their own agent module in a folder of their own outside the
repository, and every command they would type next.

What it holds the commands to: ``validate`` catches the unimportable module and the
misspelled id before anything runs (exit 2, the fix named, nothing written); with the
module in place, ``run`` -> ``status`` -> ``runs`` -> ``show`` -> ``export`` each say
something a person can act on; no output anywhere is a Python repr.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

AGENT = '''\
"""The researcher's own agent: a noisy quadratic whose curvature is the factor `a`."""


def quadratic(factors, rng):
    a = float(factors["a"])
    if a < 0:
        raise ValueError(f"a must be non-negative, got {a}")
    x = float(rng.normal())
    loss = a * x * x
    return {"output": {"text": f"x={x:.4f}"}, "metrics": {"loss": loss, "primary_outcome": loss}}
'''

STUDY = """\
study_id: quad-study
title: Does curvature change the loss?
factors:
  - name: a
    levels:
      - {{name: negative, value: -1.0}}
      - {{name: flat, value: 1.0}}
      - {{name: steep, value: 4.0}}
agent_specs: [{agents}]
problem_ids: [noop]
run_budget: {{replicates: 3}}
bindings:
  agents:
    quad-rx: "quadlab:quadratic"
"""
RUNS = 9  # 3 levels x 3 replicates; the 3 runs of a = -1.0 fail

# A dataclass or namedtuple repr (`ErrorSummary(error_kind=...`), a dict repr of strings.
REPR = re.compile(r"\b[A-Z][A-Za-z0-9_]*\(\w+=|\{'\w+': ")


@pytest.fixture(scope="module")
def studyq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``studyq`` of a fresh virtual environment: ``pip install -e`` of this checkout."""
    env_dir = tmp_path_factory.mktemp("first-hour") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-e", str(REPO_ROOT)],
        check=True, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    yield env_dir / "bin" / "studyq"


class Session:
    """Commands typed in the researcher's study folder; every output kept for the repr check."""

    def __init__(self, studyq: Path, folder: Path) -> None:
        self.studyq = studyq
        self.folder = folder
        self.outputs: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("STUDYQ_")}
        for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
            self.env.pop(name, None)
        self.env["PATH"] = f"{studyq.parent}{os.pathsep}{self.env.get('PATH', '')}"

    def __call__(self, *args: str, expect: int) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.studyq), *args],
            cwd=self.folder,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        shown = f"$ studyq {' '.join(args)}\n(exit {done.returncode})\n{done.stdout}{done.stderr}"
        self.outputs.append(shown)
        assert done.returncode == expect, shown
        assert "Traceback" not in done.stderr, shown
        return done


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_first_hour_with_a_users_own_agent(studyq: Path, tmp_path: Path) -> None:
    # Given the researcher's folder: a study file, and their agent in a subfolder where
    # nothing imports it from, and one agent id misspelled
    folder = tmp_path / "my-study"
    (folder / "lab").mkdir(parents=True)
    (folder / "lab" / "quadlab.py").write_text(AGENT, encoding="utf-8")
    study = folder / "study.yaml"
    study.write_text(STUDY.format(agents="quad-rx, quad-rz"), encoding="utf-8")
    sh = Session(studyq, folder)
    assert sys.executable != str(studyq.parent / "python")

    # When they validate it, then both problems are named with their fixes, exit 2
    done = sh("validate", "study.yaml", expect=2)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3, done.stderr
    assert "bindings.agents.quad-rx" in lines[0] and "No module named 'quadlab'" in lines[0]
    assert f"Fix: 'quadlab' is in {folder / 'lab'}" in lines[0]
    assert "agent_specs[1]: unknown agent 'quad-rz'" in lines[1]
    assert "did you mean 'quad-rx'?" in lines[1]
    assert lines[2] == "2 problems found; nothing was changed."
    # And `run` refuses the same way before registering anything
    sh("run", "study.yaml", "--no-progress", expect=2)
    assert not (folder / "studyq.db").exists(), "a refused run created the store"

    # Given the fixes: the module next to the study, the id corrected
    (folder / "lab" / "quadlab.py").rename(folder / "quadlab.py")
    study.write_text(STUDY.format(agents="quad-rx"), encoding="utf-8")
    done = sh("validate", "study.yaml", expect=0)
    assert "study.yaml: valid" in done.stdout
    assert "a cluster worker needs it installed" in done.stdout

    # When it runs: the failing level fails, the others succeed, and it says where to look
    done = sh("run", "study.yaml", "--no-progress", expect=1)
    assert f"executed {RUNS} runs now (6 succeeded, 3 failed)" in done.stdout
    assert "`studyq status`" in done.stderr

    # Then status names conditions by their levels and says how to fix the failures
    done = sh("status", "quad-study", expect=0)
    assert "cancelled" in done.stdout
    assert "a=-1.0" in done.stdout or "negative" in done.stdout, done.stdout
    assert "ValueError" in done.stdout and "Fix:" in done.stdout
    assert "studyq show run-" in done.stdout

    # And runs lists the failed ones, and the best by the agent's own metric
    done = sh("runs", "quad-study", "--status", "failed", expect=0)
    failed_ids = re.findall(r"\brun-[0-9a-f]{12}\b", done.stdout)
    assert len(set(failed_ids)) == 3, done.stdout
    assert "a must be non-negative" in done.stdout
    done = sh("runs", "quad-study", "--best", "2", "--metric", "loss", expect=0)
    assert len(set(re.findall(r"\brun-[0-9a-f]{12}\b", done.stdout))) == 2, done.stdout
    sh("runs", "quad-study", "--best", "2", "--metric", "no_such_metric", expect=2)

    # And show prints one failed run with its traceback
    done = sh("show", failed_ids[0], expect=0)
    assert "Traceback" in done.stdout and "quadlab.py" in done.stdout
    assert "ValueError: a must be non-negative, got -1.0" in done.stdout

    # And the export carries the factor levels and the agent's metrics as columns
    sh("export", "quad-study", "--out", "results", expect=0)
    with (folder / "results" / "runs.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == RUNS
    assert {row["a"] for row in rows} == {"-1.0", "1.0", "4.0"}
    losses = [row["metric_loss"] for row in rows if row["status"] == "success"]
    assert len(losses) == 6 and all(float(value) >= 0 for value in losses)

    # And nothing anywhere was a Python repr
    for shown in sh.outputs:
        assert not REPR.search(shown), f"a repr in the output:\n{shown}"
