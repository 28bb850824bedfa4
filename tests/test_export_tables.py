"""SpooledCsv writes the bytes csv.DictWriter writes for the same rows, in one pass.

Given rows whose later keys add columns (so earlier rows are short and must be padded),
cells that need quoting (commas, quotes, newlines, a carriage return), None, floats and
bools, when the rows go through SpooledCsv as positional cells, then the table is
byte-identical to a DictWriter of the full header, and no spool file is left behind.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest

from orchestrator.export_tables import SpooledCsv, csv_line

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


class _Text(str):
    """A str subclass: csv.writer writes its str(), as csv_line must."""


CELLS: list[Any] = [
    "plain", "", None, 0, -3, 1.0, 0.1 + 0.2, 1e-300, float("inf"), float("nan"), True, False,
    "a,b", 'q"uote', "line\nbreak", "cr\rhere", "nul\0byte", " padded ", "naïve ✓",
    "\u2028sep", [1, "x"], {"k": 1}, _Text("sub"), ("t",),
]  # fmt: skip


def _writer_line(cells: list[Any]) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer).writerow(cells)
    return buffer.getvalue()


def test_csv_line_is_the_writers_line_or_none() -> None:
    """Every pair and triple of the tricky cells above, and rows of one cell and none:
    csv_line gives csv.writer's line or None (then the row goes to csv.writer), and None
    only when a cell needs quoting (or holds a NUL) or the row is shorter than two cells."""
    rows: list[list[Any]] = [[], *([cell] for cell in CELLS)]
    rows += [[a, b] for a in CELLS for b in CELLS]
    rows += [[a, b, c] for a in CELLS[:8] for b in CELLS for c in CELLS[12:]]
    quoted = 0
    for cells in rows:
        line = csv_line(cells)
        if line is None:
            quoted += 1
            nul = any("\0" in str(cell) for cell in cells)  # quoted by some versions
            assert len(cells) < 2 or '"' in _writer_line(cells) or nul, cells
        else:
            assert line == _writer_line(cells), cells
    assert 0 < quoted < len(rows)
    assert csv_line(["plain", "", None, 7, 0.5, True, [1], " pad "]) == (
        "plain,,,7,0.5,True,[1], pad \r\n"
    )
