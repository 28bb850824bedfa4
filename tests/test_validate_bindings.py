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


def test_a_module_next_to_the_study_resolves_and_the_cluster_caveat_is_noted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a study binding a module that sits next to the study file, on no import path
    study = _bound_study(tmp_path, "quadlab_beside")
    before = _files(tmp_path)
    # When it is validated
    code, out, err = run_main(["validate", str(study)], capsys)
    # Then it resolves (as `studyq run` imports from the study's folder), and a note says what
    # a cluster worker needs; nothing is written next to the study
    assert code == EXIT_OK, err
    assert f"{study}: valid" in out
    assert f"'quadlab_beside' is imported from the study's folder {tmp_path}" in out
    assert f"PYTHONPATH={tmp_path}" in out and "`pip install -e`" in out
    assert err == ""
    assert _files(tmp_path) == before, "validate wrote something (a __pycache__?)"
    assert str(tmp_path) not in sys.path, "validate left the study's folder on sys.path"


def test_a_binding_to_a_module_in_a_subfolder_exits_2_naming_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the module one folder down from the study, where nothing imports it from
    code_dir = tmp_path / "lab"
    code_dir.mkdir()
    _bound_study(code_dir, "quadlab_below")
    study = tmp_path / "study.yaml"
    (code_dir / "study.yaml").rename(study)
    before = _files(tmp_path)
    # When it is validated
    code, out, err = run_main(["validate", str(study)], capsys)
    # Then one line names the field, the error and the folder to put on the path
    assert code == EXIT_USAGE, err
    assert out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith(f"{study}: bindings.agents.quad: agent 'quad' (agent_specs[0]): ")
    assert "cannot import 'quadlab_below:quadratic'" in line
    assert "No module named 'quadlab_below'" in line
    assert f"Fix: 'quadlab_below' is in {code_dir}, which is not on the import path" in line
    assert f"PYTHONPATH={code_dir}" in line and "`pip install -e`" in line
    assert _files(tmp_path) == before
    assert "quadlab_below" not in sys.modules


def test_a_module_found_nowhere_says_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(BOUND.format(module="quadlab_nowhere"), encoding="utf-8")

    code, _, err = run_main(["validate", str(study)], capsys)

    assert code == EXIT_USAGE, err
    (line,) = err.strip().splitlines()
    assert "Fix: make 'quadlab_nowhere' importable where workers run: `pip install -e`" in line


def test_the_same_study_passes_without_a_note_once_its_module_is_importable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = _bound_study(tmp_path, "quadlab_found")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "quadlab_found", raising=False)

    code, out, err = run_main(["validate", str(study)], capsys)

    assert code == EXIT_OK, err
    assert f"{study}: valid" in out
    assert "note" not in out
    assert err == ""


def test_run_imports_the_agent_from_the_study_folder_in_its_pool_processes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a study whose agent module sits next to it, on no import path
    study = _bound_study(tmp_path, "quadlab_pooled")
    study.write_text(study.read_text().replace("beam-design", "noop"), encoding="utf-8")
    db = tmp_path / "store.db"
    # When it runs in a process pool
    code, out, err = run_main(
        ["run", str(study), "--db", f"sqlite:///{db}", "--jobs", "1", "--no-progress"], capsys
    )
    # Then every run resolved its agent (no binding error), in the pool's child process too
    assert "binding" not in err.lower(), err
    from orchestrator.store import ResultStore

    with ResultStore.open(f"sqlite:///{db}") as store:
        kinds = {run.error_kind for run in store.iter_runs("quad-study")}
    assert kinds == {None}, (code, out, err)
    assert code == EXIT_OK


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
    assert "Fix: make 'simlab_absent' importable where workers run" in line


def test_run_refuses_before_registering_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(BOUND.format(module="quadlab_unrun"), encoding="utf-8")
    db = tmp_path / "store.db"

    code, _, err = run_main(
        ["run", str(study), "--db", f"sqlite:///{db}", "--jobs", "1", "--no-progress"], capsys
    )

    assert code == EXIT_USAGE, err
    assert "bindings.agents.quad" in err and "on PYTHONPATH" in err
    assert "Traceback" not in err
    assert not db.exists(), "run registered the study before refusing it"


SIDE_EFFECT = """\
from pathlib import Path

Path(__file__).with_name("imported.marker").write_text("ran")
raise RuntimeError("the lab's API key is not set")


def quadratic(problem, seed):
    return {"text": "x"}
"""


def test_validate_checks_references_without_running_the_study_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an agent module whose import has side effects and fails (no API key here)
    (tmp_path / "quadlab_effects.py").write_text(SIDE_EFFECT, encoding="utf-8")
    study = tmp_path / "study.yaml"
    study.write_text(BOUND.format(module="quadlab_effects"), encoding="utf-8")
    # When it is validated by default
    code, _, err = run_main(["validate", str(study)], capsys)
    # Then the reference is found (module and name) without running the module
    assert code == EXIT_OK, err
    assert not (tmp_path / "imported.marker").exists(), "validate ran the agent's module"
    assert "quadlab_effects" not in sys.modules
    # When it is validated with --import
    code, _out, err = run_main(["validate", "--import", str(study)], capsys)
    # Then the module runs, as in a run, and its error is the problem
    assert code == EXIT_USAGE
    assert (tmp_path / "imported.marker").exists()
    (line,) = err.strip().splitlines()
    assert "bindings.agents.quad" in line and "the lab's API key is not set" in line
    sys.modules.pop("quadlab_effects", None)


def test_a_misspelled_name_after_the_colon_is_found_without_importing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "quadlab_named.py").write_text(AGENT, encoding="utf-8")
    study = tmp_path / "study.yaml"
    study.write_text(BOUND.format(module="quadlab_named").replace(":quadratic", ":quadratc"))

    code, _, err = run_main(["validate", str(study)], capsys)

    assert code == EXIT_USAGE
    (line,) = err.strip().splitlines()
    assert "module 'quadlab_named' has no attribute 'quadratc'" in line
    assert "Fix: check the name after ':' in 'quadlab_named:quadratc'" in line
    assert "quadlab_named" not in sys.modules


def test_import_and_no_resolve_exclude_each_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = _bound_study(tmp_path, "quadlab_flags")

    with pytest.raises(SystemExit) as stopped:
        run_main(["validate", "--import", "--no-resolve", str(study)], capsys)

    assert stopped.value.code == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err
