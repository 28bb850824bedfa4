"""Column types and the database clock, portable between SQLite and PostgreSQL.

Leases must be judged by one clock: workers on many machines disagree about the time, the
database does not. :func:`db_now` and :func:`db_now_plus` render the database's own clock in
SQL. On PostgreSQL that is ``now()`` (the transaction's start, so every row one transaction
touches gets the same stamp); on SQLite it is ``strftime(..., 'now')`` formatted exactly as
SQLAlchemy stores Python datetimes on SQLite (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC), so values
written by SQL and by Python compare correctly as text.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ColumnElement, DateTime, Float, String, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import SQLCoreOperations
from sqlalchemy.sql.expression import FunctionElement, bindparam
from sqlalchemy.types import TypeEngine

__all__ = [
    "JSONType",
    "OrderedJSONType",
    "UTCDateTime",
    "db_now",
    "db_now_plus",
    "iso_from_utc_text",
    "json_field_equals",
    "utc_text",
]

JSONType: TypeEngine[Any] = JSON(none_as_null=True).with_variant(
    JSONB(none_as_null=True), "postgresql"
)
"""JSON on SQLite, JSONB on PostgreSQL (compact, indexable, queryable by analysts).

Python ``None`` is stored as SQL ``NULL`` (not JSON ``null``), so ``IS NULL`` finds it.

JSONB re-orders object keys, so it is used only for values whose key order carries no
meaning (outputs, metrics, provenance, lists)."""

OrderedJSONType: TypeEngine[Any] = JSON(none_as_null=True)
"""JSON that keeps object keys in the order they were written, on both backends (``json``
on PostgreSQL). Used where key order is data: the study definition (study.yaml is written in
its order), factor and block assignments (they become CSV columns in factor order), and the
``extra`` keys of evaluation and event rows (CSV columns in first-seen order)."""


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware.

    PostgreSQL keeps ``timestamptz``; SQLite has no time zones, so values are converted to UTC
    before they are written and tagged UTC when read. Naive input is taken to be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class db_now(FunctionElement[datetime]):
    """The database's current time (see the module docstring)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"


class db_now_plus(FunctionElement[datetime]):
    """The database's current time plus ``seconds`` (a float; negative for the past)."""

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now_plus"

    def __init__(self, seconds: float, *, name: str | None = None) -> None:
        """``name`` makes the seconds a named parameter of a prebuilt statement (pass its
        value at execution); otherwise the value is bound here."""
        self.seconds = float(seconds)
        if name is None:
            super().__init__(bindparam("seconds", self.seconds, unique=True))
        else:
            super().__init__(bindparam(name, type_=Float()))


_SQLITE_FORMAT = "'%Y-%m-%d %H:%M:%f'"


@compiles(db_now, "postgresql")
def _now_pg(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    return "now()"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: SQLCompiler, **kw: Any) -> str:
    # %f gives milliseconds; pad to SQLAlchemy's six-digit storage format.
    return f"(strftime({_SQLITE_FORMAT}, 'now') || '000')"


@compiles(db_now_plus, "postgresql")
def _now_plus_pg(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(now() + make_interval(secs => CAST({seconds} AS DOUBLE PRECISION)))"


@compiles(db_now_plus, "sqlite")
def _now_plus_sqlite(element: db_now_plus, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    modifier = f"(printf('%+.3f', {seconds}) || ' seconds')"
    return f"(strftime({_SQLITE_FORMAT}, 'now', {modifier}) || '000')"


class utc_text(FunctionElement[str]):
    """A timestamp column as the text of its UTC value, ``YYYY-MM-DD HH:MM:SS.ffffff``: what
    SQLAlchemy stores on SQLite (read as stored), formatted by PostgreSQL from
    ``timestamptz`` whatever the session's time zone. The exporter writes every run's and
    attempt's times as ISO text; turning the text into a ``datetime`` and back cost about
    3 µs a timestamp, most of an attempts.csv row (:func:`iso_from_utc_text` costs 0.4)."""

    type = String()
    inherit_cache = True
    name = "utc_text"


@compiles(utc_text, "postgresql")
def _utc_text_pg(element: utc_text, compiler: SQLCompiler, **kw: Any) -> str:
    column = compiler.process(element.clauses, **kw)
    return f"to_char(({column}) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"


@compiles(utc_text, "sqlite")
def _utc_text_sqlite(element: utc_text, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.clauses, **kw)


def iso_from_utc_text(stored: str | None) -> str | None:
    """``datetime.isoformat()`` of a :class:`utc_text` value (``+00:00``, and no fraction
    when the microseconds are zero, as ``isoformat`` leaves them out), made from the text.
    A value in another layout (written by hand-made SQL on SQLite) is parsed instead."""
    if stored is None:
        return None
    if len(stored) == 26 and stored[10] == " " and stored[19] == ".":
        if stored.endswith("000000"):
            return f"{stored[:10]}T{stored[11:19]}+00:00"
        return f"{stored[:10]}T{stored[11:]}+00:00"
    value = datetime.fromisoformat(stored)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


class json_field_equals(FunctionElement[bool]):
    """``column[key] == value`` for a JSON object column, the same on both backends.

    Compares JSON values, not their text: ``0.7``, ``"0.7"`` and ``true`` stay distinct.
    PostgreSQL compares as ``jsonb`` (plain ``json`` has no equality operator); SQLite runs
    both sides through ``json_extract`` so they get the same SQL type.
    """

    type = Boolean()
    inherit_cache = True
    name = "json_field_equals"

    def __init__(
        self, column: ColumnElement[Any] | SQLCoreOperations[Any], key: str, value: Any
    ) -> None:
        super().__init__(
            column,
            bindparam("json_key", key, type_=String(), unique=True),
            bindparam("json_value", json.dumps(value), type_=String(), unique=True),
        )


@compiles(json_field_equals, "postgresql")
def _field_equals_pg(element: json_field_equals, compiler: SQLCompiler, **kw: Any) -> str:
    column, key, value = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"(CAST(({column} -> {key}) AS JSONB) = CAST({value} AS JSONB))"


@compiles(json_field_equals, "sqlite")
def _field_equals_sqlite(element: json_field_equals, compiler: SQLCompiler, **kw: Any) -> str:
    column, key, value = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"(json_extract({column}, '$.' || json_quote({key})) = json_extract({value}, '$'))"


@compiles(JSON, "sqlite")
def _json_is_text_on_sqlite(type_: JSON, compiler: Any, **kw: Any) -> str:
    """Declare JSON columns ``TEXT`` on SQLite. A column declared ``JSON`` gets NUMERIC
    affinity there, which silently turns a stored scalar ``1.0`` into the integer ``1``; the
    artifacts must say ``1.0`` as the upstream and PostgreSQL do."""
    return "TEXT"
