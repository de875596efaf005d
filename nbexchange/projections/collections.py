"""Read model: every submission per assignment, the latest per student marked."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nbexchange.clock import as_utc
from nbexchange.db import metadata
from nbexchange.events.domain import (
    ArchiveRejected,
    ArchiveUnpacked,
    Collected,
    Submitted,
)
from nbexchange.events.store import RecordedEvent
from nbexchange.projections.assignments import PENDING, REJECTED, UNPACKED
from nbexchange.projections.base import Rows

submissions = sa.Table(
    "proj_submissions",
    metadata,
    sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("org_id", sa.Integer, nullable=False),
    sa.Column("course_id", sa.String(255), nullable=False),
    sa.Column("assignment_id", sa.String(255), nullable=False),
    sa.Column("student_id", sa.String(255), nullable=False),
    sa.Column("full_name", sa.String(255), nullable=True),
    sa.Column("email", sa.String(255), nullable=True),
    sa.Column("lms_user_id", sa.String(255), nullable=True),
    sa.Column("timestamp", sa.DateTime(timezone=True), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("path", sa.String(64), nullable=False, unique=True),
    sa.Column("archive_sha256", sa.String(64), nullable=False),
    sa.Column("archive_size", sa.BigInteger, nullable=False),
    sa.Column("archive_state", sa.String(16), nullable=False),
    sa.Column("archive_reason", sa.Text, nullable=True),
    sa.Column("notebooks", sa.Text, nullable=False),
    sa.Column("latest", sa.Boolean, nullable=False),
    sa.Column("collected_count", sa.Integer, nullable=False),
    sa.Column("last_collected_at", sa.DateTime(timezone=True), nullable=True),
    sa.Index(
        "ix_proj_submissions_assignment",
        "org_id",
        "course_id",
        "assignment_id",
        "student_id",
    ),
)


class CollectionsProjection:
    """Submissions, with who sent them, their archive's state and whether they were collected."""

    name = "collections"
    tables = (submissions,)

    def apply(self, rows: Rows, event: RecordedEvent) -> None:
        data = event.data
        if isinstance(data, Submitted):
            rows.execute(
                submissions.update()
                .where(
                    submissions.c.org_id == data.org_id,
                    submissions.c.course_id == data.course_id,
                    submissions.c.assignment_id == data.assignment_id,
                    submissions.c.student_id == data.student_id,
                    submissions.c.latest.is_(True),
                )
                .values(latest=False)
            )
            rows.insert(
                submissions,
                {
                    "position": event.position,
                    "org_id": data.org_id,
                    "course_id": data.course_id,
                    "assignment_id": data.assignment_id,
                    "student_id": data.student_id,
                    "full_name": event.actor.full_name,
                    "email": event.actor.email,
                    "lms_user_id": event.actor.lms_user_id,
                    "timestamp": data.timestamp,
                    "recorded_at": event.recorded_at,
                    # The event's own hash: unique, unguessable, and names the submission.
                    "path": event.hash,
                    "archive_sha256": data.archive_sha256,
                    "archive_size": data.archive_size,
                    "archive_state": PENDING,
                    "archive_reason": None,
                    "notebooks": json.dumps(list(data.notebooks)),
                    "latest": True,
                    "collected_count": 0,
                    "last_collected_at": None,
                },
            )
        elif isinstance(data, ArchiveUnpacked):
            rows.execute(
                submissions.update()
                .where(submissions.c.position == data.source_position)
                .values(archive_state=UNPACKED, notebooks=json.dumps(list(data.notebooks)))
            )
        elif isinstance(data, ArchiveRejected):
            rows.execute(
                submissions.update()
                .where(submissions.c.position == data.source_position)
                .values(archive_state=REJECTED, archive_reason=data.reason)
            )
        elif isinstance(data, Collected):
            rows.execute(
                submissions.update()
                .where(submissions.c.position == data.submission_position)
                .values(
                    collected_count=submissions.c.collected_count + 1,
                    last_collected_at=event.recorded_at,
                )
            )


def _submission(row: Any) -> dict[str, Any]:
    item = dict(row._mapping)
    item["timestamp"] = as_utc(item["timestamp"])
    item["recorded_at"] = as_utc(item["recorded_at"])
    item["notebooks"] = tuple(json.loads(item["notebooks"]))
    return item


def list_submissions(
    conn: Connection,
    org_id: int,
    course_id: str,
    assignment_id: str,
    student_id: str | None = None,
    latest_only: bool = False,
) -> list[dict[str, Any]]:
    """An assignment's submissions, oldest first; optionally one student's, or only the latest."""
    query = sa.select(submissions).where(
        submissions.c.org_id == org_id,
        submissions.c.course_id == course_id,
        submissions.c.assignment_id == assignment_id,
    )
    if student_id is not None:
        query = query.where(submissions.c.student_id == student_id)
    if latest_only:
        query = query.where(submissions.c.latest.is_(True))
    return [_submission(r) for r in conn.execute(query.order_by(submissions.c.position))]


def get_submission(
    conn: Connection, org_id: int, course_id: str, assignment_id: str, path: str
) -> dict[str, Any] | None:
    """The submission named by its opaque ``path`` token, if it is in this assignment."""
    row = conn.execute(
        sa.select(submissions).where(
            submissions.c.path == path,
            submissions.c.org_id == org_id,
            submissions.c.course_id == course_id,
            submissions.c.assignment_id == assignment_id,
        )
    ).first()
    return _submission(row) if row else None
