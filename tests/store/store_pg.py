"""The throwaway PostgreSQL databases of the store tests (127.0.0.1 only).

When PostgreSQL cannot be reached, tests that need it are skipped with the reason, unless
``CI`` is set: then they fail, so CI can never go green by silently skipping them.
"""

from __future__ import annotations

import os
import re

import pytest
from sqlalchemy import Engine, create_engine, text

PG_HOST = "127.0.0.1"
PG_PORT = int(os.environ.get("STUDYQ_TEST_PG_PORT", "5432"))
PG_ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/postgres"


def _admin_engine() -> Engine:
    return create_engine(
        PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )


def create_pg_database(name: str) -> str:
    """Create an empty database (skip or, in CI, fail when PostgreSQL is unreachable)."""
    admin = _admin_engine()
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as error:  # any failure to reach the server means "no PostgreSQL here"
        reason = f"PostgreSQL at {PG_HOST}:{PG_PORT} is not usable: {error}".splitlines()[0]
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set, so PostgreSQL tests must run)")
        pytest.skip(reason)
    finally:
        admin.dispose()
    return f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"


_TEST_DATABASE = re.compile(r"studyq_test_(\d+)(_[a-z]+)?")


def drop_stale_pg_databases() -> None:
    """Drop test databases left by sessions that were killed before their teardown: named
    ``studyq_test_<pid>...`` for a pid that no longer runs (the server is on this host)."""
    admin = _admin_engine()
    try:
        with admin.connect() as connection:
            names = connection.execute(
                text("SELECT datname FROM pg_database WHERE datname LIKE 'studyq_test_%'")
            ).scalars()
            for name in list(names):
                match = _TEST_DATABASE.fullmatch(name)
                if match and not _pid_alive(int(match.group(1))):
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_pg_database(name: str) -> None:
    admin = _admin_engine()
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
