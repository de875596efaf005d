"""Submissions keep no rendered notebook list or archive object: lists render them from cached pieces.

Both columns repeated other columns of the row (``notebooks``, and the
archive's state, reason and size) as list-item JSON, a quarter of each row's
bytes. Rows are kept: no rebuild is needed.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_COLUMNS = ("notebooks_entry", "archive_entry")


def upgrade() -> None:
    with op.batch_alter_table("proj_submissions") as batch_op:
        for name in _COLUMNS:
            batch_op.drop_column(name)


def downgrade() -> None:
    with op.batch_alter_table("proj_submissions") as batch_op:
        for name in _COLUMNS:
            batch_op.add_column(sa.Column(name, sa.Text(), nullable=True))
    # Filled as revision 0004's code rendered them (a copy: that code is gone).
    table = sa.table(
        "proj_submissions",
        *(sa.column(name) for name in ("position", "notebooks", "archive_state", "archive_reason", "archive_size")),
        *(sa.column(name) for name in _COLUMNS),
    )
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(
            table.c.position, table.c.notebooks, table.c.archive_state, table.c.archive_reason, table.c.archive_size
        )
    ).all()
    if rows:
        bind.execute(
            table.update()
            .where(table.c.position == sa.bindparam("at"))
            .values(notebooks_entry=sa.bindparam("nbs"), archive_entry=sa.bindparam("archive")),
            [
                {
                    "at": position,
                    "nbs": orjson.dumps(
                        [
                            {
                                "notebook_id": nb,
                                "has_exchange_feedback": False,
                                "feedback_updated": False,
                                "feedback_timestamp": None,
                            }
                            for nb in orjson.loads(notebooks)
                        ]
                    ).decode(),
                    "archive": orjson.dumps({"state": state, "reason": reason, "size": size}).decode(),
                }
                for position, notebooks, state, reason, size in rows
            ],
        )
    with op.batch_alter_table("proj_submissions") as batch_op:
        for name in _COLUMNS:
            batch_op.alter_column(name, existing_type=sa.Text(), nullable=False)
