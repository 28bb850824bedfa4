"""Bulk inserts inside the caller's transaction: PostgreSQL ``COPY``, executemany elsewhere.

Registering a 1,000,000-run study is the largest write studyq makes. ``COPY ... FROM STDIN``
on the transaction's own driver connection streams the rows to the server without binding
parameters row by row (executemany's cost), and stays inside the same transaction, so a
concurrent reader still sees all of a study or nothing. SQLite has no ``COPY``; its
executemany is already a loop inside the engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Table, exc, insert
from sqlalchemy.engine import Connection

from orchestrator.store.engine import json_dumps

__all__ = ["BulkWriter"]


_MEMO_LIMIT = 10_000
"""Distinct JSON values remembered per writer: a study's conditions repeat theirs in every
one of their runs; past this many, the memo starts over."""


class BulkWriter:
    """Appends rows of one table, given as tuples in ``columns`` order, in the transaction of
    ``connection``; columns named in ``json_columns`` hold Python values that are serialized
    as the engine serializes JSON (``None`` is SQL ``NULL``).

    JSON values are taken as immutable: a value met again (the same string, or the same
    dict or list object) is written as the text it was encoded to the first time.
    """

    def __init__(
        self,
        connection: Connection,
        table: Table,
        columns: Sequence[str],
        *,
        json_columns: Iterable[str] = (),
    ) -> None:
        self.connection = connection
        self.table = table
        self.columns = tuple(columns)
        json_names = set(json_columns)
        self.json_positions = tuple(i for i, name in enumerate(self.columns) if name in json_names)
        self.copy = connection.dialect.name == "postgresql"
        names = ", ".join(f'"{name}"' for name in self.columns)
        self.copy_sql = f'COPY "{table.name}" ({names}) FROM STDIN'
        self._texts: dict[Any, str] = {}
        self._objects: dict[int, tuple[Any, str]] = {}

    def _json(self, value: Any) -> str | None:
        """``value`` as the engine's JSON serializer writes it, remembered (see the class)."""
        if value is None:
            return None
        if isinstance(value, str | int | float | bool):
            key = (type(value), value)
            text = self._texts.get(key)
            if text is None:
                if len(self._texts) >= _MEMO_LIMIT:
                    self._texts.clear()
                text = self._texts[key] = json_dumps(value)
            return text
        known = self._objects.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        if len(self._objects) >= _MEMO_LIMIT:
            self._objects.clear()
        text = json_dumps(value)
        self._objects[id(value)] = (value, text)  # holding it keeps its id from being reused
        return text

    def write(self, batches: Iterable[Sequence[Sequence[Any]]]) -> int:
        """Insert the rows of ``batches`` (the caller bounds a batch's size) and return how
        many there were: on PostgreSQL
        one ``COPY`` for all of them, so the server never waits between batches, and
        psycopg sends its buffer as it fills; elsewhere one executemany per batch. An error
        raised while a batch is produced aborts the ``COPY`` and propagates as it is."""
        written = 0
        if not self.copy:
            for rows in batches:
                if rows:
                    self.connection.execute(
                        insert(self.table),
                        [dict(zip(self.columns, row, strict=True)) for row in rows],
                    )
                    written += len(rows)
            return written
        driver = self.connection.connection.driver_connection
        if driver is None:  # pragma: no cover - a checked-out connection always has one
            raise RuntimeError("the connection has no driver connection")
        json_positions = self.json_positions
        try:
            with driver.cursor() as cursor, cursor.copy(self.copy_sql) as copy:
                for rows in batches:
                    for row in rows:
                        if json_positions:
                            row = list(row)
                            for position in json_positions:
                                row[position] = self._json(row[position])
                        copy.write_row(row)
                    written += len(rows)
        except exc.DBAPIError:
            raise
        except Exception as error:
            dbapi = self.connection.dialect.dbapi
            if dbapi is None or not isinstance(error, dbapi.Error):
                raise
            # Worded like any other statement's error by the caller's transaction helper.
            raise exc.DBAPIError.instance(
                self.copy_sql, None, error, dbapi.Error, dialect=self.connection.dialect
            ) from error
        return written
