"""Idempotency keys keep their request's fingerprint; the blobs read model names what the log still owns.

On PostgreSQL, streams take the "C" collation (byte order, as SQLite's
BINARY): the events route's exact prefix match is then a range of the unique
``(stream, version)`` index.

``events.request_hash`` is filled for new events only (outside the hash
chain: no stored hash changes). ``proj_blob_refs`` starts empty at
checkpoint 0: the next catch-up fills it from the log, as for any new read
model.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


_BYTE_ORDER = sa.String(1024, collation="C")

#: The read model's checkpoint: it starts (again) from position 0 with its table.
_CHECKPOINT = sa.text("DELETE FROM projection_checkpoints WHERE name = 'blobs'")


def upgrade() -> None:
    op.execute(_CHECKPOINT)
    with op.batch_alter_table("events") as batch_op:
        batch_op.add_column(sa.Column("request_hash", sa.String(64), nullable=True))
    position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "proj_blob_refs",
        sa.Column("position", position, autoincrement=False, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("course_id", sa.String(255), nullable=False),
        sa.Column("assignment_id", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_proj_blob_refs")),
    )
    op.create_index(op.f("ix_proj_blob_refs_sha256"), "proj_blob_refs", ["sha256"])
    op.create_index("ix_proj_blob_refs_assignment", "proj_blob_refs", ["org_id", "course_id", "assignment_id", "kind"])
    if op.get_bind().dialect.name == "postgresql":
        # Streams in byte order (SQLite's BINARY is already): the events
        # route's exact prefix match is then a range of the unique index.
        # Equality is unchanged; the table and its indexes are rewritten once.
        op.alter_column("events", "stream", type_=_BYTE_ORDER, existing_type=sa.String(1024), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("events", "stream", type_=sa.String(1024), existing_type=_BYTE_ORDER, existing_nullable=False)
    op.drop_table("proj_blob_refs")
    op.execute(_CHECKPOINT)
    with op.batch_alter_table("events") as batch_op:
        batch_op.drop_column("request_hash")
