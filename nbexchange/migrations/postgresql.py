"""What the migrations do on PostgreSQL only: the functions an append calls (SQLite appends without them)."""

from __future__ import annotations

from alembic import op


def execute_on_postgresql(statement: str) -> None:
    """Run ``statement`` if the database being migrated is PostgreSQL."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute(statement)
