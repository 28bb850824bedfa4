"""The throwaway PostgreSQL databases of the store tests: tests/_services.py's, under the
names the store tests import."""

from __future__ import annotations

from _services import create_pg_database, drop_pg_database, drop_stale_pg_databases

__all__ = ["create_pg_database", "drop_pg_database", "drop_stale_pg_databases"]
