"""events.csv and evaluations.csv from the store are what csv.DictWriter writes for the rows.

``write_child_table`` reads each row once and places its extra keys by position; a row with
the keys of the rows before it takes a shortcut. Given rows whose extras repeat, grow,
come in another order, repeat a required column, or hold a JSON cell of the other table,
the table must be the DictWriter table of the store's own rows (``EventRecord.row``): the
required columns, then the extra keys in first-seen order, JSON cells as sorted JSON.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from store_factories import STUDY_ID, claim, make_result, queue_all, register

from orchestrator.export_tables import JSON_CELLS, write_child_table
from orchestrator.store import ResultStore
from orchestrator.store.columns import EVALUATION_COLUMNS, EVENT_COLUMNS
from orchestrator.store.models import EvaluationRow, EventRow

EXTRAS: list[dict[str, Any]] = [
    {"level": "step", "run": "a"},
    {"level": "step", "run": "b"},  # the keys before: the shortcut
    {"level": "step", "run": "c", "tool": "grep"},  # one more
    {"run": "d", "level": "top"},  # another order
    {"level": "step", "run": "e", "tool": "ls"},
    {"level": "x", "run": "f", "tool": "t", "notes_json": {"b": 1, "a": [2]}},  # a JSON cell
    {"level": "y", "run": "g", "tool": "u", "notes_json": {"z": 0}},
    {"level": "step", "run": "h", "text": "an extra named like a column"},
    {"level": "step", "run": "i", "tool": "v"},
]


def _expected(path: Path, records: list[Any]) -> bytes:
    rows = [dict(record.row) for record in records]
    header: list[str] = []
    for row in rows:
        header.extend(key for key in row if key not in header)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        for row in rows:
            for key in JSON_CELLS & row.keys():
                if isinstance(row[key], Mapping):
                    row[key] = json.dumps(row[key], sort_keys=True)
            writer.writerow(row)
    return path.read_bytes()


def test_child_tables_are_the_dictwriter_tables_of_the_stored_rows(
    store: ResultStore, tmp_path: Path
) -> None:
    register(store, len(EXTRAS))
    queue_all(store)
    for index, extra in enumerate(EXTRAS):
        won = claim(store, index)
        result = make_result(won)
        events = [{"event_type": "step", "text": f"e{index}", "meta_json": {"n": 1}, **extra}]
        evaluations = [{"evaluator_id": "ev", "metric_name": "m", "metric_value": 1, **extra}]
        assert store.finish_run(won, replace(result, events=events, evaluations=evaluations))

    cases: list[tuple[Any, Any, list[Any]]] = [
        (EventRow, EVENT_COLUMNS, list(store.iter_events(STUDY_ID))),
        (EvaluationRow, EVALUATION_COLUMNS, list(store.iter_evaluations(STUDY_ID))),
    ]
    for table, columns, records in cases:
        path = tmp_path / f"{table.__tablename__}.csv"
        assert write_child_table(store.engine, table, columns, STUDY_ID, path) == len(EXTRAS)
        assert path.read_bytes() == _expected(tmp_path / "expected.csv", records)
    with (tmp_path / "events.csv").open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle))
    assert header[-4:] == ["level", "run", "tool", "notes_json"]
