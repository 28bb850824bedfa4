"""``STUDYQ_TRUST_STUDY_BINDINGS``: a worker may refuse the code a study's bindings name.

Given a study registered with a binding to a module whose import leaves a marker file, when a
worker executes one of its runs, then with the setting true (the default) the module is
imported and the run succeeds; with it false the run fails as a ``binding`` error naming the
setting and the fix, and the module is never imported, unless the worker's own
``STUDYQ_ALLOWED_IMPORTS`` lists it. Entry points stay importable either way.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.contracts.errors import SettingsError
from orchestrator.contracts.results import ErrorKind, RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.study.plan import prepare
from workers.config import WorkerSettings, load_worker_settings
from workers.execution import execute_run
from workers.runtime import StudyContext, WorkerRuntime

STUDY_ID = "trust-bindings"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STUDYQ_TRUST_STUDY_BINDINGS", "STUDYQ_ALLOWED_IMPORTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("STUDYQ_DATABASE_URL_FILE", raising=False)
    monkeypatch.delenv("STUDYQ_BROKER_URL_FILE", raising=False)


@pytest.fixture
def store(tmp_path: Path, marker_module: tuple[str, Path]) -> Iterator[ResultStore]:
    """A SQLite store holding the study, registered with its binding to the marker module
    (and one agent served by an installed entry point)."""
    name, _ = marker_module
    study = tmp_path / "study.yaml"
    study.write_text(
        f"study_id: {STUDY_ID}\ntitle: Trust bindings\n"
        "agent_specs: [planner, noop]\nproblem_ids: [noop]\n"
        f"bindings:\n  agents:\n    planner: '{name}:agent'\n",
        encoding="utf-8",
    )
    with ResultStore.open(f"sqlite:///{tmp_path / 'store.db'}") as opened:
        register(opened, prepare(study))
        yield opened


def _spec(agent_id: str) -> RunSpec:
    return RunSpec(
        study_id=STUDY_ID, run_id=f"run-{agent_id}", condition_id="cond-1",
        replicate=1, seed=1, agent_id=agent_id, problem_id="noop",
    )  # fmt: skip


def _context(store: ResultStore, settings: WorkerSettings) -> StudyContext:
    """The study's context exactly as a worker process builds it."""
    runtime = WorkerRuntime(settings, worker="test:1", store=store)
    context = runtime.study(STUDY_ID)
    assert context is not None
    return context


def test_the_setting_defaults_to_true_and_reads_false(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_worker_settings().trust_study_bindings is True
    monkeypatch.setenv("STUDYQ_TRUST_STUDY_BINDINGS", "false")
    assert load_worker_settings().trust_study_bindings is False


def test_a_setting_that_is_not_a_boolean_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STUDYQ_TRUST_STUDY_BINDINGS", "sometimes")
    with pytest.raises(SettingsError, match="STUDYQ_TRUST_STUDY_BINDINGS"):
        load_worker_settings()


def test_a_trusting_worker_imports_the_registered_binding(
    store: ResultStore, marker_module: tuple[str, Path]
) -> None:
    _, marker = marker_module
    context = _context(store, load_worker_settings())
    result = execute_run(_spec("planner"), context.resolver)
    assert result.status is RunStatus.SUCCESS, result.traceback
    assert marker.exists()


def test_a_worker_that_does_not_trust_bindings_refuses_them_before_importing(
    store: ResultStore, marker_module: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, marker = marker_module
    monkeypatch.setenv("STUDYQ_TRUST_STUDY_BINDINGS", "false")
    context = _context(store, load_worker_settings())

    result = execute_run(_spec("planner"), context.resolver)

    assert (result.status, result.error_kind) == (RunStatus.FAILED, ErrorKind.BINDING)
    message = result.error_message or ""
    assert f"'{name}:agent' refused" in message
    assert "STUDYQ_TRUST_STUDY_BINDINGS=false" in message
    assert f"Fix: add '{name}' to STUDYQ_ALLOWED_IMPORTS" in message
    assert not marker.exists()
    assert name not in sys.modules
    # Entry points are still importable
    assert execute_run(_spec("noop"), context.resolver).status is RunStatus.SUCCESS


def test_the_workers_own_allow_list_still_admits_the_module(
    store: ResultStore, marker_module: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, marker = marker_module
    monkeypatch.setenv("STUDYQ_TRUST_STUDY_BINDINGS", "false")
    monkeypatch.setenv("STUDYQ_ALLOWED_IMPORTS", name)
    context = _context(store, load_worker_settings())
    result = execute_run(_spec("planner"), context.resolver)
    assert result.status is RunStatus.SUCCESS, result.traceback
    assert marker.exists()
