"""The exchange's use cases: who may do what, which event it appends, what a read shows.

Handlers call these (in a thread: they block on the database); these call the
log, the archive store and the projections. Nothing here knows about HTTP.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO

from nbexchange.clock import format_timestamp, parse_timestamp
from nbexchange.db import translate_errors
from nbexchange.errors import Conflict, Forbidden, NotFound, UnsafeArchive
from nbexchange.events.domain import (
    Actor,
    Collected,
    DomainEvent,
    FeedbackFetched,
    FeedbackReleased,
    Fetched,
    Released,
    Submitted,
    Unreleased,
    assignment_stream,
)
from nbexchange.events.store import AppendRequest, RecordedEvent
from nbexchange.identity.base import User
from nbexchange.projections import NAMES, checkpoints
from nbexchange.projections.assignments import (
    REJECTED,
    Release,
    archive_used_elsewhere,
    course_releases,
    get_release,
    user_actions,
)
from nbexchange.projections.collections import (
    archive_submitted,
    get_submission,
    list_submissions,
    notebook_entry,
    submission_items_json,
)
from nbexchange.projections.feedback import file_in_feedback, student_feedback
from nbexchange.projections.history import course_history
from nbexchange.runtime import Runtime
from nbexchange.storage import StoredArchive


@dataclass(frozen=True)
class Written:
    """The answer to a write: the event, and whether an earlier identical request made it."""

    event: RecordedEvent
    duplicate: bool


@dataclass(frozen=True)
class Download:
    """A stored archive to send, and the event that recorded the download."""

    file: BinaryIO
    size: int
    event: RecordedEvent


@dataclass(frozen=True)
class FeedbackFile:
    """One stored feedback file to send, and what the answer says about it."""

    file: BinaryIO
    size: int
    filename: str
    timestamp: str
    checksum: str


class Exchange:
    """The use cases, on one process's runtime."""

    def __init__(self, runtime: Runtime, consistency_timeout: float = 10.0) -> None:
        self.rt = runtime
        self.consistency_timeout = consistency_timeout

    # -- who may act -----------------------------------------------------

    @staticmethod
    def member(user: User, course_id: str) -> str:
        """The user's role in the course; ``Forbidden`` if they have none."""
        role = user.role_in(course_id)
        if role is None:
            raise Forbidden(f"You are not a member of course {course_id!r}.")
        return role

    @staticmethod
    def instructor(user: User, course_id: str, doing: str) -> None:
        """``Forbidden`` unless the user is an Instructor of the course."""
        Exchange.member(user, course_id)
        if not user.is_instructor(course_id):
            raise Forbidden(f"Only an Instructor of course {course_id!r} may {doing}.")

    @staticmethod
    def actor(user: User, course_id: str) -> Actor:
        """The user as the log records them, with their role in this course."""
        return Actor(
            name=user.name,
            role=user.role_in(course_id) or "",
            full_name=user.full_name,
            email=user.email,
            lms_user_id=user.lms_user_id,
        )

    # -- writes ----------------------------------------------------------

    def _append(self, user: User, event: DomainEvent, key: str | None, expected_version: int | None = None) -> Written:
        scoped = _scoped_key(user, key) if key else None
        appended = self.rt.committer.append(
            AppendRequest(event, self.actor(user, event.course_id), expected_version, scoped)
        )
        if appended.duplicate:
            return _first_answer(appended.event, event)
        return Written(appended.event, duplicate=False)

    def release(
        self,
        user: User,
        course_id: str,
        assignment_id: str,
        notebooks: Sequence[str],
        upload: StoredArchive,
        key: str | None = None,
    ) -> Written:
        """Release an assignment's archive; a concurrent release of the same assignment conflicts."""
        self.instructor(user, course_id, "release assignments")
        event = Released(user.org_id, course_id, assignment_id, tuple(notebooks), upload.sha256, upload.size)
        earlier = self._replayed(user, key, event)
        if earlier is not None:
            return earlier
        seen = self.rt.store.stream_version(event.stream())
        return self._append(user, event, key, expected_version=seen)

    def _replayed(self, user: User, key: str | None, event: DomainEvent) -> Written | None:
        """The first answer to a retried request, before its preconditions are checked again.

        A retry must get the answer its first attempt got, not a conflict with
        itself (a stream version it moved) or a 404 (an assignment it withdrew).
        """
        if not key:
            return None
        earlier = self.rt.store.by_idempotency_key(_scoped_key(user, key))
        return None if earlier is None else _first_answer(earlier, event)

    def unrelease(
        self, user: User, course_id: str, assignment_id: str, purge: bool = False, key: str | None = None
    ) -> Written:
        """Withdraw a released assignment; ``purge`` also removes its stored archive after the event."""
        self.instructor(user, course_id, "unrelease assignments")
        earlier = self._replayed(user, key, Unreleased(user.org_id, course_id, assignment_id))
        if earlier is not None:
            return earlier
        with translate_errors(), self.rt.engine.connect() as conn:
            release = get_release(conn, user.org_id, course_id, assignment_id)
            if release is None or not release.active:
                raise NotFound(f"Assignment {assignment_id!r} is not released in course {course_id!r}.")
            sha = release.archive_sha256
            # Stored bytes are shared by everything with the same sha256: a
            # student who submitted the release unchanged keeps their submission.
            shared = (
                archive_used_elsewhere(conn, release) or archive_submitted(conn, sha) or file_in_feedback(conn, sha)
            )
        purged = (release.archive_sha256,) if purge and not shared else ()
        event = Unreleased(user.org_id, course_id, assignment_id, purge=purge, purged_archives=purged)
        written = self._append(user, event, key, expected_version=self.rt.store.stream_version(event.stream()))
        for sha in purged:
            self.rt.archives.remove(sha)
        return written

    def fetch(self, user: User, course_id: str, assignment_id: str, key: str | None = None) -> Download:
        """Record that a member fetched the released archive, and say where it is."""
        self.member(user, course_id)
        release = self._live_release(user, course_id, assignment_id)
        if not self.rt.archives.exists(release.archive_sha256):
            # Purged by an unrelease the projections have not caught up with yet.
            raise NotFound(f"Assignment {assignment_id!r} is not released in course {course_id!r} any more.")
        event = Fetched(user.org_id, course_id, assignment_id, user.name, release.position, release.archive_sha256)
        return self._download(release.archive_sha256, self._append(user, event, key).event)

    def _download(self, sha256: str, event: RecordedEvent) -> Download:
        file = self.rt.archives.open(sha256)
        return Download(file, os.fstat(file.fileno()).st_size, event)

    def _live_release(self, user: User, course_id: str, assignment_id: str) -> Release:
        with translate_errors(), self.rt.engine.connect() as conn:
            release = get_release(conn, user.org_id, course_id, assignment_id)
        if release is None or not release.active:
            raise NotFound(f"Assignment {assignment_id!r} is not released in course {course_id!r}.")
        if release.archive_state == REJECTED:
            raise UnsafeArchive(f"The released archive was rejected: {release.archive_reason}")
        return release

    def submit(
        self,
        user: User,
        course_id: str,
        assignment_id: str,
        timestamp: datetime,
        upload: StoredArchive,
        key: str | None = None,
    ) -> Written:
        """Record a submission of a released assignment."""
        self.member(user, course_id)
        release = self._live_release(user, course_id, assignment_id)
        event = Submitted(
            user.org_id,
            course_id,
            assignment_id,
            user.name,
            timestamp=timestamp,
            archive_sha256=upload.sha256,
            archive_size=upload.size,
            notebooks=release.notebooks,
        )
        return self._append(user, event, key)

    def collect(self, user: User, course_id: str, assignment_id: str, path: str, key: str | None = None) -> Download:
        """Record that an instructor collected one submission, and say where its archive is."""
        self.instructor(user, course_id, "collect submissions")
        with translate_errors(), self.rt.engine.connect() as conn:
            submission = get_submission(conn, user.org_id, course_id, assignment_id, path)
        if submission is None:
            raise NotFound(f"No submission {path!r} for assignment {assignment_id!r} in course {course_id!r}.")
        if submission["archive_state"] == REJECTED:
            raise UnsafeArchive(f"This submission's archive was rejected: {submission['archive_reason']}")
        if not self.rt.archives.exists(submission["archive_sha256"]):
            raise NotFound(f"The archive of submission {path!r} is no longer stored.")
        event = Collected(
            user.org_id,
            course_id,
            assignment_id,
            submission["student_id"],
            submission_position=submission["position"],
            archive_sha256=submission["archive_sha256"],
        )
        return self._download(submission["archive_sha256"], self._append(user, event, key).event)

    def release_feedback(
        self,
        user: User,
        course_id: str,
        assignment_id: str,
        notebook_id: str,
        student_id: str,
        timestamp: datetime,
        checksum: str,
        upload: StoredArchive,
        key: str | None = None,
    ) -> Written:
        """Release feedback on one notebook of the student's submission made at ``timestamp``."""
        self.instructor(user, course_id, "release feedback")
        with translate_errors(), self.rt.engine.connect() as conn:
            theirs = list_submissions(conn, user.org_id, course_id, assignment_id, student_id=student_id)
        if not any(s["timestamp"] == timestamp for s in theirs):
            raise NotFound(
                f"Student {student_id!r} has no submission of {assignment_id!r} at {format_timestamp(timestamp)}."
            )
        event = FeedbackReleased(
            user.org_id,
            course_id,
            assignment_id,
            student_id,
            notebook_id=notebook_id,
            timestamp=timestamp,
            checksum=checksum,
            feedback_sha256=upload.sha256,
            feedback_size=upload.size,
        )
        return self._append(user, event, key)

    def fetch_feedback(
        self, user: User, course_id: str, assignment_id: str, key: str | None = None
    ) -> tuple[list[FeedbackFile], RecordedEvent | None]:
        """The caller's own feedback files, opened for sending, and the fetch's event if there were any.

        The caller closes the files. Their bytes are never read here: they are sent
        in chunks (``FeedbackHandler``), so a large feedback costs no memory.
        """
        self.member(user, course_id)
        with translate_errors(), self.rt.engine.connect() as conn:
            rows = student_feedback(conn, user.org_id, course_id, assignment_id, user.name)
        if not rows:
            return [], None
        files: list[FeedbackFile] = []
        try:
            for row in rows:
                download = self.rt.archives.open(row["feedback_sha256"])
                files.append(
                    FeedbackFile(
                        download,
                        os.fstat(download.fileno()).st_size,
                        filename=f"{row['notebook_id']}.html",
                        timestamp=format_timestamp(row["timestamp"]),
                        checksum=row["checksum"],
                    )
                )
            event = FeedbackFetched(
                user.org_id, course_id, assignment_id, user.name, tuple(r["position"] for r in rows)
            )
            return files, self._append(user, event, key).event
        except BaseException:
            for opened in files:
                opened.file.close()
            raise

    # -- reads -----------------------------------------------------------

    def position(self) -> int:
        """The position every projection has reached: what reads reflect."""
        marks = checkpoints(self.rt.engine)
        return min(marks.get(name, 0) for name in NAMES)

    def reached(self, min_position: int) -> int | None:
        """The read position if the projections have reached ``min_position``, else ``None``."""
        current = self.position()
        return current if current >= min_position else None

    def assignments(self, user: User, course_id: str) -> list[dict[str, Any]]:
        """The course's released assignments and the caller's own actions, as list items."""
        self.member(user, course_id)
        with translate_errors(), self.rt.engine.connect() as conn:
            released = course_releases(conn, user.org_id, course_id)
            mine = user_actions(conn, user.org_id, course_id, user.name)
            feedback: dict[str, list[dict[str, Any]]] = {}
            for assignment_id in {a["assignment_id"] for a in mine if a["status"] == "submitted"}:
                feedback[assignment_id] = student_feedback(conn, user.org_id, course_id, assignment_id, user.name)
        live = {r.assignment_id: r.notebooks for r in released}
        items = [
            {
                "assignment_id": r.assignment_id,
                "course_id": course_id,
                "student_id": user.name,
                "status": "released",
                "path": r.archive_sha256,
                "timestamp": format_timestamp(r.released_at),
                "notebooks": [notebook_entry(nb) for nb in r.notebooks],
                "archive": {"state": r.archive_state, "reason": r.archive_reason},
            }
            for r in released
        ]
        for action in mine:
            if action["assignment_id"] not in live:
                continue
            item: dict[str, Any] = {
                "assignment_id": action["assignment_id"],
                "course_id": course_id,
                "student_id": action["student_id"],
                "status": action["status"],
                "path": action["archive_sha256"] or "",
                "timestamp": format_timestamp(action["timestamp"]),
                "notebooks": [notebook_entry(nb) for nb in action["notebooks"] or live[action["assignment_id"]]],
            }
            if action["status"] == "submitted":
                item["archive"] = {"state": action["archive_state"], "reason": action["archive_reason"]}
                given = [f for f in feedback.get(action["assignment_id"], []) if f["timestamp"] == action["timestamp"]]
                item["notebooks"] = [
                    notebook_entry(nb, given) for nb in action["notebooks"] or live[action["assignment_id"]]
                ]
            items.append(item)
        return items

    def collections(self, user: User, course_id: str, assignment_id: str, student_id: str | None = None) -> str:
        """Every submission of an assignment (optionally one student's), oldest first, as a JSON array."""
        self.instructor(user, course_id, "list submissions")
        with translate_errors(), self.rt.engine.connect() as conn:
            feedback = student_feedback(conn, user.org_id, course_id, assignment_id, student_id)
            return submission_items_json(conn, user.org_id, course_id, assignment_id, student_id, feedback)

    def history(self, user: User, course_id: str | None = None, action: str | None = None) -> list[dict[str, Any]]:
        """The caller's view of the log, grouped by course and assignment.

        Instructors see everything in their courses; students see releases and
        what concerns them.
        """
        courses = [course_id] if course_id else sorted(user.courses)
        if course_id:
            self.member(user, course_id)
        grouped: list[dict[str, Any]] = []
        with translate_errors(), self.rt.engine.connect() as conn:
            for course in courses:
                viewer = None if user.is_instructor(course) else user.name
                rows = course_history(conn, user.org_id, [course], user_id=viewer, action=action)
                assignments: dict[str, list[dict[str, Any]]] = {}
                for row in rows:
                    assignments.setdefault(row["assignment_id"], []).append(
                        {
                            "position": row["position"],
                            "action": row["action"],
                            "user": row["actor"],
                            "role": row["role"],
                            "student_id": row["student_id"],
                            **_details(row["details"]),
                            "timestamp": format_timestamp(row["recorded_at"]),
                        }
                    )
                grouped.append(
                    {
                        "course_id": course,
                        "role": user.role_in(course),
                        "assignments": [{"assignment_id": a, "actions": acts} for a, acts in assignments.items()],
                    }
                )
        return grouped

    def events(
        self, user: User, course_id: str, after: int = 0, limit: int = 100, assignment_id: str | None = None
    ) -> list[dict[str, Any]]:
        """A page of raw events of one course, with their hashes, for an auditor."""
        self.instructor(user, course_id, "read the course's raw events")
        if assignment_id:
            inside = f"{user.org_id}/{course_id}/{assignment_id}/"
            page = self.rt.store.read_streams(
                streams=[assignment_stream(user.org_id, course_id, assignment_id)],
                prefixes=[f"student/{inside}", f"check/{inside}"],
                after=after,
                limit=limit,
            )
        else:
            course = f"{user.org_id}/{course_id}/"
            page = self.rt.store.read_streams(
                prefixes=[f"assignment/{course}", f"student/{course}", f"check/{course}"], after=after, limit=limit
            )
        return [event.to_json() for event in page]


def _details(details: dict[str, Any]) -> dict[str, Any]:
    """A history line's payload facts; the client's own timestamp is shown in nbgrader's format."""
    out = dict(details)
    if "timestamp" in out:
        out["submission_timestamp"] = format_timestamp(parse_timestamp(out.pop("timestamp")))
    return out


def _scoped_key(user: User, key: str) -> str:
    # Keys are the client's: scoped per user, two users' keys never collide.
    return f"{user.org_id}/{user.name}/{key}"


def _first_answer(earlier: RecordedEvent, event: DomainEvent) -> Written:
    """The first answer to a repeated request; ``Conflict`` if its key was used for another request."""
    if earlier.type != event.TYPE or earlier.stream != event.stream():
        raise Conflict("This Idempotency-Key was already used for a different request; use a new key.")
    return Written(earlier, duplicate=True)
