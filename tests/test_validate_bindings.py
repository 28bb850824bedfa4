"""``studyq validate`` (and ``studyq run``) resolve every agent, problem and runner a study
names before anything runs: an id that would fail every run is one line with its field and
fix, exit 2, nothing written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cli_support import _no_studyq_environment, run_main  # noqa: F401

from orchestrator.cli import EXIT_OK, EXIT_USAGE

BOUND = """\
study_id: quad-study
title: Quadratic agent
agent_specs: [quad]
problem_ids: [beam-design]
bindings:
  agents:
    quad: "{module}:quadratic"
"""

AGENT = """\
def quadratic(problem, seed):
    return {"text": "x"}
"""


def _bound_study(folder: Path, module: str) -> Path:
    """A study binding ``quad`` to ``<module>:quadratic``, a module next to the study."""
    (folder / f"{module}.py").write_text(AGENT, encoding="utf-8")
    path = folder / "study.yaml"
    path.write_text(BOUND.format(module=module), encoding="utf-8")
    return path


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def test_a_binding_to_a_module_not_on_sys_path_exits_2_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _bound_study(tmp_path, "quadlab_missing")
    before = _files(tmp_path)

    code, out, err = run_main(["validate", str(study)], capsys)

    assert code == EXIT_USAGE, err
    assert out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"{study}: bindings.agents.quad: agent 'quad' (agent_specs[0]): ")
    assert "cannot import 'quadlab_missing:quadratic'" in line
    assert "No module named 'quadlab_missing'" in line
    assert f"Fix: 'quadlab_missing' is in {tmp_path}, which is not on sys.path" in line
    assert f"PYTHONPATH={tmp_path}" in line and "`pip install -e`" in line
    assert _files(tmp_path) == before, "validate wrote something (a __pycache__?)"
    assert "quadlab_missing" not in sys.modules


def test_the_same_study_passes_once_its_module_is_importable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = _bound_study(tmp_path, "quadlab_found")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "quadlab_found", raising=False)

    code, out, err = run_main(["validate", str(study)], capsys)

    assert code == EXIT_OK, err
    assert f"{study}: valid" in out
    assert err == ""


def test_a_misspelled_agent_id_names_the_installed_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(
        "study_id: typo\ntitle: Typo\n"
        "factors:\n  - name: agent\n    levels:\n"
        "      - {name: random, value: random-serch}\n"
        "      - {name: hill, value: hill-climb}\n"
        "problem_ids: [beam-design, spring-desgn]\n",
        encoding="utf-8",
    )

    code, out, err = run_main(["validate", str(study)], capsys)

    assert code == EXIT_USAGE, err
    assert out == ""
    lines = err.strip().splitlines()
    assert lines == [
        f"{study}: factors[0].levels[0].value: unknown agent 'random-serch'. Fix: it is not "
        "bound in `bindings.agents` and no installed agent has that name; did you mean "
        "'random-search'?",
        f"{study}: problem_ids[1]: unknown problem 'spring-desgn'. Fix: it is not bound in "
        "`bindings.problems` and no installed problem has that name; did you mean "
        "'spring-design'?",
        "2 problems found; nothing was changed.",
    ]


def test_no_resolve_checks_the_file_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _bound_study(tmp_path, "quadlab_elsewhere")

    code, out, err = run_main(["validate", "--no-resolve", str(study)], capsys)

    assert code == EXIT_OK, err
    assert f"{study}: valid" in out


def test_a_missing_runner_is_named_by_its_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(
        'study_id: sim\ntitle: Sim\nbindings:\n  runner: "simlab_absent:run"\n', encoding="utf-8"
    )

    code, _, err = run_main(["validate", str(study)], capsys)

    assert code == EXIT_USAGE, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"{study}: bindings.runner: runner: cannot import 'simlab_absent:run'")
    assert "Fix: make it importable where workers run" in line


def test_run_refuses_before_registering_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _bound_study(tmp_path, "quadlab_unrun")
    db = tmp_path / "store.db"

    code, _, err = run_main(
        ["run", str(study), "--db", f"sqlite:///{db}", "--jobs", "1", "--no-progress"], capsys
    )

    assert code == EXIT_USAGE, err
    assert "bindings.agents.quad" in err and "PYTHONPATH=" in err
    assert "Traceback" not in err
    assert not db.exists(), "run registered the study before refusing it"
