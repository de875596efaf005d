"""Read models (assignments, collections, feedback, history) and their checkpoints.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "proj_actions",
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("course_id", sa.String(length=255), nullable=False),
        sa.Column("assignment_id", sa.String(length=255), nullable=False),
        sa.Column("user_id", sa.String(length=255), nullable=False),
        sa.Column("student_id", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("notebooks", sa.Text(), nullable=False),
        sa.Column("archive_sha256", sa.String(length=64), nullable=True),
        sa.Column("archive_state", sa.String(length=16), nullable=True),
        sa.Column("archive_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_proj_actions")),
    )
    with op.batch_alter_table("proj_actions", schema=None) as batch_op:
        batch_op.create_index("ix_proj_actions_user", ["org_id", "course_id", "user_id"], unique=False)

    op.create_table(
        "proj_feedback",
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("course_id", sa.String(length=255), nullable=False),
        sa.Column("assignment_id", sa.String(length=255), nullable=False),
        sa.Column("student_id", sa.String(length=255), nullable=False),
        sa.Column("notebook_id", sa.String(length=255), nullable=False),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("checksum", sa.String(length=255), nullable=False),
        sa.Column("feedback_sha256", sa.String(length=64), nullable=False),
        sa.Column("released_by", sa.String(length=255), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_proj_feedback")),
    )
    with op.batch_alter_table("proj_feedback", schema=None) as batch_op:
        batch_op.create_index(
            "ix_proj_feedback_student",
            ["org_id", "course_id", "assignment_id", "student_id"],
            unique=False,
        )

    op.create_table(
        "proj_history",
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("course_id", sa.String(length=255), nullable=False),
        sa.Column("assignment_id", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("student_id", sa.String(length=255), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("details", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_proj_history")),
    )
    with op.batch_alter_table("proj_history", schema=None) as batch_op:
        batch_op.create_index(
            "ix_proj_history_course",
            ["org_id", "course_id", "assignment_id"],
            unique=False,
        )

    op.create_table(
        "proj_releases",
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("course_id", sa.String(length=255), nullable=False),
        sa.Column("assignment_id", sa.String(length=255), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("released_by", sa.String(length=255), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("notebooks", sa.Text(), nullable=False),
        sa.Column("archive_sha256", sa.String(length=64), nullable=False),
        sa.Column("archive_state", sa.String(length=16), nullable=False),
        sa.Column("archive_reason", sa.Text(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("org_id", "course_id", "assignment_id", name=op.f("pk_proj_releases")),
    )
    op.create_table(
        "proj_submissions",
        sa.Column("position", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("course_id", sa.String(length=255), nullable=False),
        sa.Column("assignment_id", sa.String(length=255), nullable=False),
        sa.Column("student_id", sa.String(length=255), nullable=False),
        sa.Column("full_name", sa.String(length=255), nullable=True),
        sa.Column("email", sa.String(length=255), nullable=True),
        sa.Column("lms_user_id", sa.String(length=255), nullable=True),
        sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("path", sa.String(length=64), nullable=False),
        sa.Column("archive_sha256", sa.String(length=64), nullable=False),
        sa.Column("archive_size", sa.BigInteger(), nullable=False),
        sa.Column("archive_state", sa.String(length=16), nullable=False),
        sa.Column("archive_reason", sa.Text(), nullable=True),
        sa.Column("notebooks", sa.Text(), nullable=False),
        sa.Column("entry", sa.Text(), nullable=False),
        sa.Column("stamp", sa.String(length=64), nullable=False),
        sa.Column("notebooks_entry", sa.Text(), nullable=False),
        sa.Column("archive_entry", sa.Text(), nullable=False),
        sa.Column("collected_count", sa.Integer(), nullable=False),
        sa.Column("last_collected_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("position", name=op.f("pk_proj_submissions")),
        sa.UniqueConstraint("path", name=op.f("uq_proj_submissions_path")),
    )
    with op.batch_alter_table("proj_submissions", schema=None) as batch_op:
        batch_op.create_index(
            "ix_proj_submissions_assignment",
            ["org_id", "course_id", "assignment_id", "student_id"],
            unique=False,
        )

    op.create_table(
        "projection_checkpoints",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_projection_checkpoints")),
    )


def downgrade() -> None:
    op.drop_table("projection_checkpoints")
    with op.batch_alter_table("proj_submissions", schema=None) as batch_op:
        batch_op.drop_index("ix_proj_submissions_assignment")

    op.drop_table("proj_submissions")
    op.drop_table("proj_releases")
    with op.batch_alter_table("proj_history", schema=None) as batch_op:
        batch_op.drop_index("ix_proj_history_course")

    op.drop_table("proj_history")
    with op.batch_alter_table("proj_feedback", schema=None) as batch_op:
        batch_op.drop_index("ix_proj_feedback_student")

    op.drop_table("proj_feedback")
    with op.batch_alter_table("proj_actions", schema=None) as batch_op:
        batch_op.drop_index("ix_proj_actions_user")

    op.drop_table("proj_actions")
