"""Alembic migration scripts of the result store (run through ``orchestrator.store.schema``)."""
