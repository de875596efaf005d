"""Read model: each course's released assignments and each user's own actions on them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nbexchange.db import POSITION, Moment, metadata
from nbexchange.events.domain import (
    ArchiveRejected,
    ArchiveUnpacked,
    Collected,
    FeedbackFetched,
    FeedbackReleased,
    Fetched,
    Released,
    Submitted,
    Unreleased,
)
from nbexchange.events.store import RecordedEvent
from nbexchange.projections.base import Rows

PENDING, UNPACKED, REJECTED = "pending", "unpacked", "rejected"

releases = sa.Table(
    "proj_releases",
    metadata,
    sa.Column("org_id", sa.Integer, primary_key=True),
    sa.Column("course_id", sa.String(255), primary_key=True),
    sa.Column("assignment_id", sa.String(255), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("released_by", sa.String(255), nullable=False),
    sa.Column("released_at", Moment, nullable=False),
    sa.Column("notebooks", sa.Text, nullable=False),
    sa.Column("archive_sha256", sa.String(64), nullable=False),
    sa.Column("archive_state", sa.String(16), nullable=False),
    sa.Column("archive_reason", sa.Text, nullable=True),
    sa.Column("active", sa.Boolean, nullable=False),
    # A course's releases are listed in order from it, never sorted.
    sa.Index("ix_proj_releases_course", "org_id", "course_id", "position"),
)

actions = sa.Table(
    "proj_actions",
    metadata,
    sa.Column("position", POSITION, primary_key=True, autoincrement=False),
    sa.Column("org_id", sa.Integer, nullable=False),
    sa.Column("course_id", sa.String(255), nullable=False),
    sa.Column("assignment_id", sa.String(255), nullable=False),
    sa.Column("user_id", sa.String(255), nullable=False),
    sa.Column("student_id", sa.String(255), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("timestamp", Moment, nullable=False),
    sa.Column("notebooks", sa.Text, nullable=False),
    sa.Column("archive_sha256", sa.String(64), nullable=True),
    sa.Column("archive_state", sa.String(16), nullable=True),
    sa.Column("archive_reason", sa.Text, nullable=True),
    # A user's actions are listed in order from it, never sorted.
    sa.Index("ix_proj_actions_user", "org_id", "course_id", "user_id", "position"),
)


def _release_key(table: sa.Table) -> sa.ColumnElement[bool]:
    return sa.and_(
        table.c.org_id == sa.bindparam("org"),
        table.c.course_id == sa.bindparam("course"),
        table.c.assignment_id == sa.bindparam("assignment"),
    )


class AssignmentsProjection:
    """Releases per course, and every action a user took, keyed by who acted."""

    def __init__(self, name: str = "assignments", tables: Sequence[sa.Table] = (releases, actions)) -> None:
        self.name = name
        self.tables = tuple(tables)
        self._releases, self._actions = self.tables
        key = _release_key(self._releases)
        self._drop_release = self._releases.delete().where(key)
        self._withdraw = self._releases.update().where(key).values(active=False)
        self._release_outcome = (
            self._releases.update()
            .where(key, self._releases.c.position == sa.bindparam("source"))
            .values(archive_state=sa.bindparam("state"), archive_reason=sa.bindparam("reason"))
        )
        self._action_outcome = (
            self._actions.update()
            .where(self._actions.c.position == sa.bindparam("source"))
            .values(archive_state=sa.bindparam("state"), archive_reason=sa.bindparam("reason"))
        )

    def into(self, name: str, tables: Sequence[sa.Table]) -> AssignmentsProjection:
        return AssignmentsProjection(name, tables)

    def apply(self, rows: Rows, event: RecordedEvent) -> None:
        data = event.data
        key = {"org": data.org_id, "course": data.course_id, "assignment": data.assignment_id}
        if isinstance(data, Released):
            rows.write(self._drop_release, key)
            rows.insert(
                self._releases,
                {
                    "org_id": data.org_id,
                    "course_id": data.course_id,
                    "assignment_id": data.assignment_id,
                    "position": event.position,
                    "released_by": event.actor.name,
                    "released_at": event.recorded_at,
                    "notebooks": orjson.dumps(list(data.notebooks)).decode(),
                    "archive_sha256": data.archive_sha256,
                    "archive_state": PENDING,
                    "archive_reason": None,
                    "active": True,
                },
            )
        elif isinstance(data, Unreleased):
            rows.write(self._withdraw, key)
        elif isinstance(data, (Fetched, Submitted, Collected, FeedbackReleased, FeedbackFetched)):
            # A submission names its notebooks; other actions show the release's (at read time).
            notebooks = list(data.notebooks) if isinstance(data, Submitted) else []
            timestamp = data.timestamp if isinstance(data, Submitted) else event.recorded_at
            sha = data.archive_sha256 if isinstance(data, (Fetched, Submitted, Collected)) else None
            rows.insert(
                self._actions,
                {
                    "position": event.position,
                    "org_id": data.org_id,
                    "course_id": data.course_id,
                    "assignment_id": data.assignment_id,
                    "user_id": event.actor.name,
                    "student_id": data.student_id,
                    "status": data.TYPE,
                    "timestamp": timestamp,
                    "notebooks": orjson.dumps(notebooks).decode(),
                    "archive_sha256": sha,
                    "archive_state": PENDING if isinstance(data, Submitted) else None,
                    "archive_reason": None,
                },
            )
        elif isinstance(data, (ArchiveUnpacked, ArchiveRejected)):
            outcome = {
                "source": data.source_position,
                "state": UNPACKED if isinstance(data, ArchiveUnpacked) else REJECTED,
                "reason": data.reason if isinstance(data, ArchiveRejected) else None,
            }
            if data.student_id is None:
                rows.write(self._release_outcome, {**key, **outcome})
            else:
                rows.write(self._action_outcome, outcome)


@dataclass(frozen=True)
class Release:
    """One assignment as it stands released (or withdrawn)."""

    org_id: int
    course_id: str
    assignment_id: str
    position: int
    released_by: str
    released_at: datetime
    notebooks: tuple[str, ...]
    archive_sha256: str
    archive_state: str
    archive_reason: str | None
    active: bool


def _release(row: Any) -> Release:
    return Release(
        org_id=row.org_id,
        course_id=row.course_id,
        assignment_id=row.assignment_id,
        position=row.position,
        released_by=row.released_by,
        released_at=row.released_at,
        notebooks=tuple(orjson.loads(row.notebooks)),
        archive_sha256=row.archive_sha256,
        archive_state=row.archive_state,
        archive_reason=row.archive_reason,
        active=row.active,
    )


# Built once: every fetch and submission reads its release.
_GET_RELEASE = sa.select(releases).where(_release_key(releases))


def get_release(conn: Connection, org_id: int, course_id: str, assignment_id: str) -> Release | None:
    """The assignment's latest release, active or not; ``None`` if it was never released."""
    row = conn.execute(_GET_RELEASE, {"org": org_id, "course": course_id, "assignment": assignment_id}).first()
    return _release(row) if row else None


def course_releases(conn: Connection, org_id: int, course_id: str) -> list[Release]:
    """The course's active releases, oldest first."""
    rows = conn.execute(
        sa.select(releases)
        .where(
            releases.c.org_id == org_id,
            releases.c.course_id == course_id,
            releases.c.active.is_(True),
        )
        .order_by(releases.c.position)
    )
    return [_release(r) for r in rows]


def user_actions(
    conn: Connection,
    org_id: int,
    course_id: str,
    user_id: str,
    assignment_id: str | None = None,
) -> list[dict[str, Any]]:
    """A user's own actions in a course, oldest first."""
    query = sa.select(actions).where(
        actions.c.org_id == org_id,
        actions.c.course_id == course_id,
        actions.c.user_id == user_id,
    )
    if assignment_id is not None:
        query = query.where(actions.c.assignment_id == assignment_id)
    out = []
    for row in conn.execute(query.order_by(actions.c.position)):
        item = dict(row._mapping)
        item["notebooks"] = tuple(orjson.loads(item["notebooks"]))
        out.append(item)
    return out
