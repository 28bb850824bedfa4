"""SpooledCsv writes the bytes csv.DictWriter writes for the same rows, in one pass.

Given rows whose later keys add columns (so earlier rows are short and must be padded),
cells that need quoting (commas, quotes, newlines, a carriage return), None, floats and
bools, when the rows go through SpooledCsv as positional cells, then the table is
byte-identical to a DictWriter of the full header, and no spool file is left behind.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from orchestrator.export_tables import SpooledCsv

ROWS: list[dict[str, Any]] = [
    {"a": 1, "b": "x,y", "c": None},
    {"a": 2.5, "b": 'say "hi"', "c": "multi\nline", "d": True},
    {"a": 1e16, "b": "", "c": "cr\rhere"},
    {"a": float("nan"), "b": "tail", "c": 0, "d": False, "e": [1, {"k": "v"}]},
]


def _dictwriter(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> bytes:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key) for key in columns})
    return path.read_bytes()


@pytest.mark.parametrize("rows", [ROWS, ROWS[:1] * 3], ids=["growing", "fixed"])
def test_spooled_table_is_byte_identical_to_dictwriter(
    tmp_path: Path, rows: list[dict[str, Any]]
) -> None:
    header: list[str] = []
    table = tmp_path / "t.csv"
    with SpooledCsv(table) as spool:
        for row in rows:
            header.extend(key for key in row if key not in header)
            spool.write([row.get(key) for key in header])
        assert spool.finish(header) == len(rows)
    assert table.read_bytes() == _dictwriter(tmp_path / "expected.csv", header, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.csv", "t.csv"]


def test_a_failed_export_leaves_no_spool(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), SpooledCsv(tmp_path / "t.csv") as spool:
        spool.write([1, 2])
        raise RuntimeError("the store went away")
    assert list(tmp_path.iterdir()) == []
