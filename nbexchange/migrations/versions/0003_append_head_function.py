"""PostgreSQL: one function takes the append lock and reads the head, in one round trip.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from nbexchange.migrations.postgresql import execute_on_postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# A VOLATILE PL/pgSQL function gives each statement in it a fresh snapshot,
# so the SELECT sees every event committed before the lock was granted. (One
# SQL statement that takes the lock and reads would read its snapshot from
# before the wait.)
CREATE = """
CREATE FUNCTION nbexchange_lock_head(lock_key bigint, stream_name text)
RETURNS TABLE (head_position bigint, head_hash varchar, head_recorded_at timestamptz, stream_version integer)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    RETURN QUERY
        SELECT e.position, e.hash, e.recorded_at,
               (SELECT max(s.version) FROM events s WHERE s.stream = stream_name)
        FROM events e ORDER BY e.position DESC LIMIT 1;
END
$$
"""


def upgrade() -> None:
    execute_on_postgresql(CREATE)


def downgrade() -> None:
    execute_on_postgresql("DROP FUNCTION nbexchange_lock_head(bigint, text)")
