"""CSV tables whose columns are known only after their last row, written in one pass.

runs.csv, events.csv and evaluations.csv have a header that depends on every row (extra
keys, in first-seen order). Rather than reading the rows twice (once for the header, once
for the cells) or holding them, each row is written at once with ``csv.writer`` to a spool
file next to the table, as the cells of the columns known so far; the table is then the
header followed by the spool, copied as bytes. Rows written before a later column appeared
are short: only then is the spool read back and those rows padded (empty cells, what
``csv.DictWriter`` writes for a missing key). The bytes are those ``csv.DictWriter`` (excel
dialect) writes for the same rows.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from sqlalchemy import Engine

from orchestrator.store.columns import EVALUATION_COLUMNS, EVENT_COLUMNS, ChildColumns
from orchestrator.store.export_reads import iter_attempt_rows, iter_child_rows
from orchestrator.store.models import EvaluationRow, EventRow

__all__ = [
    "ATTEMPT_COLUMNS",
    "JSON_CELLS",
    "SpooledCsv",
    "csv_line",
    "write_child_table",
    "write_row",
    "write_side_tables",
]

JSON_CELLS = frozenset((*EVALUATION_COLUMNS.csv_json, *EVENT_COLUMNS.csv_json))
"""Cells whose mappings are written as ``json.dumps(sort_keys=True)`` (as the upstream
writes raw mappings), in either table, declared or extra."""


def csv_line(cells: Sequence[Any]) -> str | None:
    """The line ``csv.writer`` (excel dialect) writes for ``cells`` when no cell needs
    quoting, else None (the caller writes that row with ``csv.writer``). Most cells of an
    export need none, and joining their text is half the cost: 3.4 against 6.3 µs for a
    runs.csv row of 27 cells here. A cell needs quoting when its text holds a comma, a
    quote or a line break (or a NUL, which some Python versions quote); the joined line
    shows that as one of them (or an extra comma).
    The text of a cell is ``str()``, as ``csv.writer`` makes it, and "" for None; a row of
    fewer than two cells goes to ``csv.writer`` (it quotes a lone empty cell)."""
    texts = [cell if type(cell) is str else "" if cell is None else str(cell) for cell in cells]
    line = ",".join(texts)
    if len(texts) < 2 or line.count(",") != len(texts) - 1:
        return None
    if '"' in line or "\n" in line or "\r" in line or "\0" in line:
        return None
    return line + "\r\n"


def write_row(
    handle: TextIO, writerow: Callable[[Sequence[Any]], object], cells: Sequence[Any]
) -> None:
    """One row on ``handle``: its :func:`csv_line`, or ``writerow`` (a ``csv.writer`` on
    ``handle``) when a cell needs quoting."""
    line = csv_line(cells)
    if line is None:
        writerow(cells)
    else:
        handle.write(line)


class SpooledCsv:
    """One CSV table written through a spool file (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._spool = path.with_name(f".{path.name}.spool")
        self._handle = self._spool.open("w", encoding="utf-8", newline="")
        self._write = csv.writer(self._handle).writerow
        self._narrowest: int | None = None

    def write(self, cells: Sequence[Any]) -> None:
        """One row: a cell for each column known so far, in column order (a row with fewer
        cells is padded at :meth:`finish`, at the cost of reading the spool back)."""
        write_row(self._handle, self._write, cells)
        width = len(cells)
        if self._narrowest is None or width < self._narrowest:
            self._narrowest = width
        self.rows += 1

    def finish(self, columns: Sequence[str]) -> int:
        """Write the table with its header ``columns``; returns the rows written."""
        self._handle.close()
        with self.path.open("w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(columns)
            with self._spool.open(encoding="utf-8", newline="") as spooled:
                if self._narrowest is None or self._narrowest >= len(columns):
                    shutil.copyfileobj(spooled, out, 1 << 20)
                else:
                    width = len(columns)
                    for row in csv.reader(spooled):
                        if len(row) < width:
                            row.extend([""] * (width - len(row)))
                        writer.writerow(row)
        self._spool.unlink(missing_ok=True)
        return self.rows

    def __enter__(self) -> SpooledCsv:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._handle.close()
        self._spool.unlink(missing_ok=True)


def write_child_table(
    store_engine: Engine,
    table: type[EvaluationRow] | type[EventRow],
    columns: ChildColumns,
    study_id: str,
    path: Path,
) -> int:
    """evaluations.csv or events.csv in one pass over the table: the required columns (from
    the row's columns), then each extra key in first-seen order (a key that is a required
    column is not repeated); returns the rows written."""
    required = columns.csv_columns
    position = {name: i for i, name in enumerate(required)}
    header = list(required)
    json_at = [position[name] for name in required if name in JSON_CELLS]
    tail: tuple[str, ...] = ()  # the extra columns, when none is a JSON cell
    with SpooledCsv(path) as spool:
        for values in iter_child_rows(store_engine, table, study_id, required):
            extra: Mapping[str, Any] = values[-1] or {}
            cells = values[1:-1]
            for at in json_at:
                if isinstance(cells[at], Mapping):
                    cells[at] = json.dumps(cells[at], sort_keys=True)
            if tail and tuple(extra) == tail:  # most rows: the keys of the rows before
                cells.extend(extra.values())
                spool.write(cells)
                continue
            for key, value in extra.items():
                known = position.get(key)
                if known is None:
                    at = position[key] = len(header)
                    header.append(key)
                elif known < len(required):
                    continue  # a required column keeps the row's own value
                else:
                    at = known
                if len(cells) <= at:
                    cells.extend([None] * (at + 1 - len(cells)))
                if key in JSON_CELLS and isinstance(value, Mapping):
                    value = json.dumps(value, sort_keys=True)
                cells[at] = value
            if len(cells) < len(header):
                cells.extend([None] * (len(header) - len(cells)))
            spool.write(cells)
            tail = tuple(header[len(required) :])
            if JSON_CELLS.intersection(tail):
                tail = ()
        return spool.finish(header)


ATTEMPT_COLUMNS = (
    "run_id", "attempt", "worker", "started", "ended", "status", "error_kind", "error_type",
    "error_message", "plan_index",
)  # fmt: skip
"""attempts.csv (studyq's own, beside runs.csv): one row per claim of a run, in plan order
then attempt order. ``status`` is how the attempt ended (``success``, ``failed``,
``retried``: a transient error, another attempt followed; ``lost``, ``released``,
``cancelled``, ``running``); ``plan_index`` tells apart runs of a design that repeats a run
id."""


def write_attempts(store_engine: Engine, study_id: str, path: Path) -> int:
    """attempts.csv; returns the rows written."""
    count = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        write = csv.writer(handle).writerow
        write(ATTEMPT_COLUMNS)
        for cells in iter_attempt_rows(store_engine, study_id):
            write_row(handle, write, cells)
            count += 1
    return count


def write_side_tables(
    store_engine: Engine, study_id: str, evaluations: Path, events: Path, attempts: Path
) -> tuple[int, int]:
    """evaluations.csv, events.csv and attempts.csv: the tables the export may write in a
    second process while it writes runs.csv (none reads another); returns the rows of
    evaluations and of events."""
    written = (
        write_child_table(store_engine, EvaluationRow, EVALUATION_COLUMNS, study_id, evaluations),
        write_child_table(store_engine, EventRow, EVENT_COLUMNS, study_id, events),
    )
    write_attempts(store_engine, study_id, attempts)
    return written
