"""Projection rows keyed for cheaper writes: the rowid on SQLite, and submissions found by ``path_key``.

On SQLite, a primary key of any type but INTEGER is a second B-tree beside
the table; the read models' ``position`` keys become the rows' own rowid.
``proj_submissions`` drops its unique index on ``path`` (64 random
characters, the costliest index of a rebuild) for an index on ``path_key``,
the path's first 60 bits as a number. Rows are kept: no rebuild is needed.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_KEYED_BY_POSITION = ("proj_actions", "proj_feedback", "proj_history", "proj_submissions")


def _path_key(path: str) -> int:
    # As nbexchange.projections.collections.path_key at this revision (a
    # migration keeps its own copy: the code it was written against changes).
    return int(path[:15], 16)


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table("proj_submissions") as batch_op:
        batch_op.add_column(sa.Column("path_key", sa.BigInteger(), nullable=True))
        batch_op.drop_constraint("uq_proj_submissions_path", type_="unique")
    submissions = sa.table("proj_submissions", sa.column("position"), sa.column("path"), sa.column("path_key"))
    bind = op.get_bind()
    keys = [
        {"at": position, "key": _path_key(path)}
        for position, path in bind.execute(sa.select(submissions.c.position, submissions.c.path))
    ]
    if keys:
        bind.execute(
            submissions.update()
            .where(submissions.c.position == sa.bindparam("at"))
            .values(path_key=sa.bindparam("key")),
            keys,
        )
    with op.batch_alter_table("proj_submissions") as batch_op:
        batch_op.alter_column("path_key", existing_type=sa.BigInteger(), nullable=False)
        batch_op.create_index("ix_proj_submissions_path_key", ["path_key"], unique=False)
    if sqlite:
        for name in _KEYED_BY_POSITION:
            with op.batch_alter_table(name, recreate="always") as batch_op:
                batch_op.alter_column("position", existing_type=sa.BigInteger(), type_=sa.Integer())


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name in _KEYED_BY_POSITION:
            with op.batch_alter_table(name, recreate="always") as batch_op:
                batch_op.alter_column("position", existing_type=sa.Integer(), type_=sa.BigInteger())
    with op.batch_alter_table("proj_submissions") as batch_op:
        batch_op.drop_index("ix_proj_submissions_path_key")
        batch_op.drop_column("path_key")
        batch_op.create_unique_constraint("uq_proj_submissions_path", ["path"])
