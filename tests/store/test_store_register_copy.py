"""Registration through PostgreSQL ``COPY``: the same rows as SQLite's executemany, one
transaction, and a database error worded as any other (nothing half-registered)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from store_factories import DEFINITION, STUDY_ID, make_conditions, make_specs

from orchestrator.contracts.errors import StoreError
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store import ResultStore, create_engine_for
from orchestrator.store.engine import transaction
from orchestrator.store.models import Base, ConditionRow, RunRow

AWKWARD_TEXT = 'tab\there, "quoted", back\\slash, new\nline, crlf\r\n, é, 雪, \\N'
"""Every character COPY's text format escapes, its NULL marker, and non-ASCII."""


def _clean(engine: Engine) -> None:
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[ResultStore]:
    """An empty store on the session's throwaway PostgreSQL database, emptied after."""
    opened = ResultStore(create_engine_for(pg_url))
    _clean(opened.engine)
    yield opened
    _clean(opened.engine)
    opened.close()


@pytest.fixture
def sqlite_store(sqlite_template: Path, tmp_path: Path) -> Iterator[ResultStore]:
    path = tmp_path / "studyq.db"
    shutil.copyfile(sqlite_template, path)
    opened = ResultStore(create_engine_for(f"sqlite:///{path}"))
    yield opened
    opened.close()


def _awkward_specs(n: int) -> Iterator[RunSpec]:
    """Specs whose values exercise the encoding: text COPY escapes, ints and None as agent
    and problem ids, nested and empty assignments, a NUL (JSON columns replace it)."""
    agents: list[Any] = ["agent-x", 7, None, AWKWARD_TEXT]
    for spec in make_specs(n):
        factors = {"prompt": AWKWARD_TEXT, "nested": {"b": [1, 2.5, None, True]}, "a": -0.0}
        yield replace(
            spec,
            run_id=f"run-{spec.index}-{AWKWARD_TEXT}",
            agent_id=agents[spec.index % 4],
            problem_id=None if spec.index % 3 == 0 else spec.index,
            factor_assignments=factors if spec.index % 2 else {"nul": "a\x00b"},
            block_assignments={} if spec.index % 2 else {"block": AWKWARD_TEXT},
        )


def _awkward_conditions() -> list[dict[str, Any]]:
    conditions = make_conditions()
    conditions[0]["constraint_messages"] = [AWKWARD_TEXT]
    conditions[1]["metadata"] = {"label": AWKWARD_TEXT, "n": 3}
    return conditions


def _stored(store: ResultStore) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with transaction(store.engine, readonly=True) as connection:
        runs = [
            tuple(row)
            for row in connection.execute(
                select(RunRow.__table__)
                .where(RunRow.study_id == STUDY_ID)
                .order_by(RunRow.plan_index)
            )
        ]
        conditions = [
            tuple(row)
            for row in connection.execute(
                select(ConditionRow.__table__)
                .where(ConditionRow.study_id == STUDY_ID)
                .order_by(ConditionRow.position)
            )
        ]
    return runs, conditions


@pytest.mark.integration
def test_copy_writes_the_rows_executemany_writes(
    pg_store: ResultStore, sqlite_store: ResultStore
) -> None:
    # Given awkward specs registered on PostgreSQL (COPY) and on SQLite (executemany)
    for store in (pg_store, sqlite_store):
        store.register_study(
            STUDY_ID, DEFINITION, "h", "fp", _awkward_conditions(), _awkward_specs(23),
            batch_size=5,
        )  # fmt: skip
    # Then every column of every run and condition reads back the same on both
    pg_runs, pg_conditions = _stored(pg_store)
    sqlite_runs, sqlite_conditions = _stored(sqlite_store)
    assert len(pg_runs) == 23 and len(pg_conditions) == 2
    assert pg_runs == sqlite_runs
    assert pg_conditions == sqlite_conditions
    # and the specs rebuilt from the store are the registered ones, digests included
    specs = list(_awkward_specs(23))
    runs = list(pg_store.iter_runs(STUDY_ID))
    assert [run.spec.run_id for run in runs] == [spec.run_id for spec in specs]
    assert [run.spec.agent_id for run in runs] == [spec.agent_id for spec in specs]
    digests = [row[list(RunRow.__table__.c.keys()).index("spec_digest")] for row in pg_runs]
    assert digests == [spec.digest() for spec in specs]
    # and a None agent or problem is SQL NULL (IS NULL finds it), not JSON null
    for store in (pg_store, sqlite_store):
        with transaction(store.engine, readonly=True) as connection:
            nulls = connection.execute(
                select(RunRow.plan_index)
                .where(RunRow.study_id == STUDY_ID, RunRow.agent_id.is_(None))
                .order_by(RunRow.plan_index)
            ).scalars()
            assert list(nulls) == [spec.index for spec in specs if spec.agent_id is None]


@pytest.mark.integration
def test_a_copy_the_database_refuses_is_a_store_error_and_registers_nothing(
    pg_store: ResultStore,
) -> None:
    # Given a plan whose 8th run has a text PostgreSQL cannot store (a NUL in its run id),
    # in the third COPY batch
    specs = list(make_specs(12))
    specs[7] = replace(specs[7], run_id="run-\x00-7")
    # When it is registered
    with pytest.raises(StoreError):
        pg_store.register_study(
            STUDY_ID, DEFINITION, "h", "fp", make_conditions(), specs, batch_size=3
        )
    # Then nothing of the study was committed: not its row, not its first batches
    assert pg_store.find_study(STUDY_ID) is None
    assert _stored(pg_store) == ([], [])
    # and the study registers afterwards (the transaction was rolled back cleanly)
    report = pg_store.register_study(
        STUDY_ID, DEFINITION, "h", "fp", make_conditions(), make_specs(12), batch_size=3
    )
    assert report.created and report.run_count == 12
