"""Read models' lists come out of an index in the log's order instead of being sorted on every read.

An assignment's submissions and feedback, a course's history and releases,
a user's actions: each was found by an index on its course (and assignment,
or user), then sorted by position. Listing 10,000 submissions sorted about
5 MB of rows per request, through a temporary file on SQLite. Each list now
has an index ending in ``position``.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_ASSIGNMENT = ["org_id", "course_id", "assignment_id"]

#: (table, index, columns before, columns after; None: the index is new).
_INDEXES = [
    ("proj_releases", "ix_proj_releases_course", None, ["org_id", "course_id", "position"]),
    (
        "proj_actions",
        "ix_proj_actions_user",
        ["org_id", "course_id", "user_id"],
        ["org_id", "course_id", "user_id", "position"],
    ),
    (
        "proj_submissions",
        "ix_proj_submissions_assignment",
        [*_ASSIGNMENT, "student_id"],
        [*_ASSIGNMENT, "student_id", "position"],
    ),
    ("proj_submissions", "ix_proj_submissions_listed", None, [*_ASSIGNMENT, "position"]),
    (
        "proj_feedback",
        "ix_proj_feedback_student",
        [*_ASSIGNMENT, "student_id"],
        [*_ASSIGNMENT, "student_id", "position"],
    ),
    ("proj_feedback", "ix_proj_feedback_listed", None, [*_ASSIGNMENT, "position"]),
    ("proj_history", "ix_proj_history_course", [*_ASSIGNMENT], ["org_id", "course_id", "position"]),
]


def upgrade() -> None:
    for table, index, before, after in _INDEXES:
        if before is not None:
            op.drop_index(index, table_name=table)
        op.create_index(index, table, after)


def downgrade() -> None:
    for table, index, before, _after in reversed(_INDEXES):
        op.drop_index(index, table_name=table)
        if before is not None:
            op.create_index(index, table, before)
