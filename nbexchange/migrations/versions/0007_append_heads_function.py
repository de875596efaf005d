"""PostgreSQL: one function takes the append lock and reads the head and several streams' versions.

A group commit names several streams (each student's submission is a
stream of its own); with 0003's function it could not use, it took the
lock, read the head and read the versions in three round trips, all of
them under the one lock every append waits for.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from nbexchange.migrations.postgresql import execute_on_postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# VOLATILE PL/pgSQL, as 0003's: the SELECT takes its snapshot after the lock
# was granted. One row per stream asked for, each carrying the head (NULLs
# on an empty log); a stream's version is an index lookup per stream, the
# shape that keeps a cached generic plan off a scan of the log.
CREATE = """
CREATE FUNCTION nbexchange_lock_heads(lock_key bigint, stream_names varchar[])
RETURNS TABLE (head_position bigint, head_hash varchar, head_recorded_at timestamptz,
               stream_name varchar, stream_version integer)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(lock_key);
    RETURN QUERY
        SELECT h.position, h.hash, h.recorded_at, w.name,
               (SELECT max(s.version) FROM events s WHERE s.stream = w.name)
        FROM unnest(stream_names) AS w(name)
        LEFT JOIN (SELECT e.position, e.hash, e.recorded_at FROM events e ORDER BY e.position DESC LIMIT 1) AS h
            ON true;
END
$$
"""


def upgrade() -> None:
    execute_on_postgresql(CREATE)


def downgrade() -> None:
    execute_on_postgresql("DROP FUNCTION nbexchange_lock_heads(bigint, varchar[])")
