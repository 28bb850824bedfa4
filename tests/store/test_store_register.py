"""Registering studies: batched inserts, idempotence, conflicts and concurrent coordinators."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from store_factories import DEFINITION, STUDY_ID, make_conditions, make_specs, register

from orchestrator import embedded
from orchestrator.contracts.errors import StoreError, StudyConflictError, StudyInFlightError
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store import RegisterReport, ResultStore
from orchestrator.store.registration import describe_difference
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare


def test_register_creates_study_conditions_and_runs(store: ResultStore) -> None:
    report = register(store, 10)

    assert report.created is True
    assert (report.run_count, report.condition_count) == (10, 2)
    study = store.find_study(STUDY_ID)
    assert study is not None
    assert study.definition == DEFINITION
    assert (study.definition_hash, study.plan_fingerprint) == ("hash-1", "plan-fp")
    assert (study.run_count, study.condition_count, study.max_attempts) == (10, 2, 3)
    assert study.submitted_by == "tester"
    assert study.allowed_references == ["workers.demo.agents:noop"]
    assert study.submitted_at.tzinfo is not None
    assert store.count_by_status(STUDY_ID)["planned"] == 10
    # The stored specs are the registered ones, field for field.
    assert [run.spec for run in store.iter_runs(STUDY_ID)] == list(make_specs(10))


def test_definition_key_order_survives_the_round_trip(store: ResultStore) -> None:
    # study.yaml is written in the definition's key order; JSONB would sort the keys.
    definition = {"zeta": 1, "study_id": STUDY_ID, "alpha": {"y": 1, "b": 2}}
    register(store, 1, definition=definition)

    study = store.find_study(STUDY_ID)
    assert study is not None
    assert list(study.definition) == ["zeta", "study_id", "alpha"]
    assert list(study.definition["alpha"]) == ["y", "b"]
    condition = next(store.iter_conditions(STUDY_ID))
    assert list(condition.factor_assignments) == ["temperature", "prompt"]


def test_reregistering_the_same_definition_is_a_noop(store: ResultStore) -> None:
    register(store, 10)

    again = register(store, 10)

    assert again.created is False
    assert (again.run_count, again.condition_count) == (10, 2)
    assert sum(store.count_by_status(STUDY_ID).values()) == 10


def test_conflicting_definition_names_the_differences_and_the_fix(store: ResultStore) -> None:
    register(store, 4)
    changed = {**DEFINITION, "run_budget": {"replicates": 2}, "title": "Other"}

    with pytest.raises(StudyConflictError) as caught:
        register(store, 4, definition=changed, definition_hash="hash-2")

    message = str(caught.value)
    assert "study-a" in message
    assert "run_budget.replicates" in message
    assert "title" in message
    assert "new study_id" in message
    assert "delete the registered study" in message
    # Nothing of the second registration was written.
    study = store.find_study(STUDY_ID)
    assert study is not None and study.definition_hash == "hash-1"


def test_describe_difference_reports_paths() -> None:
    old = {"a": 1, "f": [{"levels": [1, 2]}, {"x": 1}], "gone": 1}
    new = {"a": 2, "f": [{"levels": [1, 3]}, {"x": 1}], "new": 1}

    assert describe_difference(old, new) == [
        "a",
        "f[0].levels[1]",
        "gone (removed)",
        "new (added)",
    ]
    assert describe_difference([1], [1, 2]) == ["<root> (1 items -> 2 items)"]
    assert len(describe_difference({str(i): i for i in range(20)}, {}, limit=3)) == 3


def test_specs_are_consumed_lazily_in_batches(store: ResultStore) -> None:
    # Given a spec generator that records how far registration has pulled it
    pulled: list[int] = []

    def specs() -> Iterator[RunSpec]:
        for spec in make_specs(23):
            pulled.append(spec.index)
            yield spec

    # When registering with a batch size of 5
    report = store.register_study(
        STUDY_ID, DEFINITION, "hash-1", "fp", make_conditions(), specs(), batch_size=5
    )

    # Then every spec is stored, in order
    assert report.run_count == 23
    assert [run.index for run in store.iter_runs(STUDY_ID)] == list(range(23))
    assert pulled == list(range(23))


def test_out_of_order_specs_are_refused_and_nothing_is_written(store: ResultStore) -> None:
    specs = list(make_specs(3))
    specs[2] = replace(specs[2], index=7)

    with pytest.raises(StoreError, match="plan order"):
        store.register_study(STUDY_ID, DEFINITION, "h", "fp", [], specs)

    assert store.find_study(STUDY_ID) is None


def test_spec_of_another_study_is_refused(store: ResultStore) -> None:
    with pytest.raises(StoreError, match="belongs to study"):
        store.register_study("other", DEFINITION, "h", "fp", [], make_specs(2))
    assert store.find_study("other") is None


def test_duplicate_run_ids_are_kept_as_separate_runs(store: ResultStore) -> None:
    # Upstream repeats run ids when a design repeats a level; both runs must exist.
    specs = [replace(spec, run_id="run-dup") for spec in make_specs(2)]
    store.register_study(STUDY_ID, DEFINITION, "h", "fp", [], specs)

    found = store.find_runs_by_id(STUDY_ID, "run-dup")
    assert [run.index for run in found] == [0, 1]


def test_two_coordinators_registering_at_once_create_it_once(
    store: ResultStore, other_store: ResultStore
) -> None:
    barrier = threading.Barrier(2)
    reports: list[object] = []

    def coordinator(target: ResultStore) -> None:
        barrier.wait()
        try:
            reports.append(register(target, 3_000))
        except Exception as error:  # surfaced by the assertion below
            reports.append(error)

    threads = [threading.Thread(target=coordinator, args=(s,)) for s in (store, other_store)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert all(isinstance(report, RegisterReport) for report in reports), reports
    assert sorted(report.created for report in reports if isinstance(report, RegisterReport)) == [
        False,
        True,
    ]
    assert sum(store.count_by_status(STUDY_ID).values()) == 3_000


def test_delete_study_removes_everything(store: ResultStore) -> None:
    register(store, 5)

    assert store.delete_study(STUDY_ID) is True
    assert store.delete_study(STUDY_ID) is False
    assert store.find_study(STUDY_ID) is None
    assert list(store.iter_runs(STUDY_ID)) == []
    assert list(store.iter_conditions(STUDY_ID)) == []
    register(store, 2)  # the id is free again


def test_delete_if_idle_refuses_while_runs_are_in_flight(store: ResultStore) -> None:
    # Given a study with planned runs, one of them queued and claimed by a worker
    register(store, 5)
    store.mark_queued(STUDY_ID, [0])
    assert store.claim_run(STUDY_ID, 0, worker="w1", lease_s=60) is not None
    # When it is deleted only if idle
    with pytest.raises(StudyInFlightError) as refused:
        store.delete_study(STUDY_ID, if_idle=True)
    # Then nothing is deleted, and the error names what is in flight and the fix
    assert refused.value.in_flight == {"planned": 4, "running": 1}
    assert f"studyq cancel {STUDY_ID}" in str(refused.value)
    assert sum(store.count_by_status(STUDY_ID).values()) == 5


def test_delete_if_idle_removes_a_study_whose_runs_all_ended(store: ResultStore) -> None:
    register(store, 3)
    store.cancel(STUDY_ID)

    assert store.delete_study(STUDY_ID, if_idle=True) is True
    assert store.find_study(STUDY_ID) is None
    assert store.delete_study(STUDY_ID, if_idle=True) is False


def test_max_attempts_must_be_positive(store: ResultStore) -> None:
    with pytest.raises(StoreError, match="max_attempts"):
        register(store, 1, max_attempts=0)


def test_list_studies(store: ResultStore) -> None:
    register(store, 2, study_id="s-one")
    register(store, 2, study_id="s-two")

    assert sorted(study.study_id for study in store.list_studies()) == ["s-one", "s-two"]


def test_a_changed_custom_matrix_file_under_the_same_study_id_is_refused(
    store: ResultStore, tmp_path: Path
) -> None:
    # Given a custom-matrix study registered from its CSV file
    matrix = tmp_path / "matrix.csv"
    matrix.write_text("temperature\n0.1\n0.5\n")
    payload = {
        "study_id": "matrix-study",
        "title": "custom matrix",
        "factors": [{"name": "temperature", "levels": [{"name": "t", "value": 0.1}]}],
        "design_spec": {"kind": "custom_matrix", "matrix_path": str(matrix)},
        "problem_ids": ["noop"],
        "agent_specs": ["noop"],
    }
    assert embedded.register(store, prepare(parse_study(payload))).created is True
    # When the file gains a row and the unchanged study file is registered again
    matrix.write_text("temperature\n0.1\n0.5\n0.9\n")
    with pytest.raises(StudyConflictError) as refused:
        embedded.register(store, prepare(parse_study(payload)))
    # Then it is refused, naming the matrix file and the fix, and nothing was added
    message = str(refused.value)
    assert "design_spec.matrix_path" in message and str(matrix) in message
    assert "plan has changed" in message and "matrix-study-v2" in message
    assert sum(store.count_by_status("matrix-study").values()) == 2
    # ...while the original file registers as the same study again
    matrix.write_text("temperature\n0.1\n0.5\n")
    assert embedded.register(store, prepare(parse_study(payload))).created is False
