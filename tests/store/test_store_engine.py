"""Engines, URLs, SQLite pragmas, the database clock and error wrapping."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from sqlalchemy import select, text

from orchestrator.contracts.errors import StoreError, StoreUnavailableError
from orchestrator.store import ResultStore, create_engine_for, mask_url, normalize_url
from orchestrator.store.engine import _json_safe, is_sqlite, transaction
from orchestrator.store.sqltypes import db_now, db_now_plus


@pytest.mark.parametrize(
    ("given", "driver"),
    [
        ("postgresql://u:p@127.0.0.1/db", "postgresql+psycopg"),
        ("postgres://u:p@127.0.0.1/db", "postgresql+psycopg"),
        ("postgresql+psycopg://u@127.0.0.1/db", "postgresql+psycopg"),
        ("sqlite:///x.db", "sqlite"),
    ],
)
def test_normalize_url_picks_supported_drivers(given: str, driver: str) -> None:
    assert normalize_url(given).drivername == driver


def test_unsupported_or_malformed_urls_are_store_errors() -> None:
    with pytest.raises(StoreError, match="Unsupported database backend 'mysql'"):
        normalize_url("mysql://root:hunter2@127.0.0.1/db")
    with pytest.raises(StoreError, match="Cannot parse") as caught:
        normalize_url("not a url :: hunter2")
    assert "sqlite:///" in str(caught.value)


def test_mask_url_hides_passwords() -> None:
    assert mask_url("postgresql://bob:hunter2@127.0.0.1:5432/db") == (
        "postgresql://bob:***@127.0.0.1:5432/db"
    )
    assert "hunter2" not in mask_url(normalize_url("postgres://bob:hunter2@127.0.0.1/db"))
    assert mask_url("sqlite:///./studyq.db") == "sqlite:///./studyq.db"
    assert mask_url("weird://bob:hunter2@host:notaport/x") == "weird://bob:***@host:notaport/x"


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        with transaction(engine, readonly=True) as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
    finally:
        engine.dispose()
    assert pragmas == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 30000,
                       "foreign_keys": 1}  # fmt: skip


def test_in_memory_sqlite_shares_one_database(tmp_path: Path) -> None:
    store = ResultStore.open("sqlite://")
    try:
        assert store.is_embedded
        assert store.list_studies() == []  # the schema created on open is visible
    finally:
        store.close()


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'a.db'}")
    try:
        with transaction(engine) as connection:
            connection.execute(text("CREATE TABLE t (x INTEGER)"))
        with pytest.raises(RuntimeError), transaction(engine) as connection:
            connection.execute(text("INSERT INTO t VALUES (1)"))
            raise RuntimeError("boom")
        with transaction(engine, readonly=True) as connection:
            assert connection.execute(text("SELECT count(*) FROM t")).scalar() == 0
        with pytest.raises(StoreError, match="failed") as caught, transaction(engine) as connection:
            connection.execute(text("INSERT INTO t VALUES ('a', 'b')"))
        assert not isinstance(caught.value, StoreUnavailableError)
    finally:
        engine.dispose()


def test_unreachable_postgres_is_store_unavailable_with_masked_url() -> None:
    # Port 1 on the loopback refuses connections immediately.
    url = "postgresql://bob:hunter2@127.0.0.1:1/studyq"
    with pytest.raises(StoreUnavailableError) as caught:
        ResultStore.open(url, connect_args={"connect_timeout": 2})
    message = str(caught.value)
    assert "hunter2" not in message
    assert "bob:***@127.0.0.1:1" in message
    assert "retry" in message


def test_is_sqlite(tmp_path: Path) -> None:
    assert is_sqlite("sqlite:///x.db")
    assert not is_sqlite("postgresql://127.0.0.1/x")
    engine = create_engine_for(f"sqlite:///{tmp_path / 'a.db'}")
    assert is_sqlite(engine)
    engine.dispose()


def test_json_safe_values() -> None:
    value = _json_safe({"a": [math.nan, math.inf, -math.inf, 1.5], "b": "x\x00y", 3: (1,)})
    assert value == {"a": ["NaN", "Infinity", "-Infinity", 1.5], "b": "x\ufffdy", "3": [1]}


def test_database_clock_arithmetic(store: ResultStore) -> None:
    with transaction(store.engine, readonly=True) as connection:
        now, later, earlier = connection.execute(
            select(db_now(), db_now_plus(90.5), db_now_plus(-30))
        ).one()
    assert now.tzinfo is not None
    assert (later - now).total_seconds() == pytest.approx(90.5, abs=0.01)
    assert (now - earlier).total_seconds() == pytest.approx(30, abs=0.01)


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
def test_a_worker_statement_on_a_dropped_connection_fails_as_unavailable_then_recovers(
    store_url: str,
) -> None:
    """Claims and results run on connections kept open for them (``AutocommitLane``, no
    pre-ping): a connection the server dropped fails once, as retryable, and is replaced."""
    from store_factories import STUDY_ID, queue_all, register

    store = ResultStore(create_engine_for(store_url, pool_pre_ping=False))
    try:
        register(store, 3)
        queue_all(store)
        assert store.claim_run(STUDY_ID, 0, worker="w", lease_s=60) is not None
        admin = create_engine_for(store_url)
        with admin.connect() as connection:
            killed = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        admin.dispose()
        assert killed >= 1

        with pytest.raises(StoreUnavailableError, match="unavailable"):
            store.claim_run(STUDY_ID, 1, worker="w", lease_s=60)
        claim = store.claim_run(STUDY_ID, 1, worker="w", lease_s=60)
        assert claim is not None and claim.index == 1
    finally:
        store.close()
