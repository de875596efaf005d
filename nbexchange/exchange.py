"""The exchange's use cases: who may do what, which event it appends, what a read shows.

Handlers call these (in a thread: they block on the database); these call the
log, the archive store and the projections. Nothing here knows about HTTP.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, BinaryIO, TypeVar

from nbexchange.clock import format_iso, format_timestamp, parse_timestamp, utcnow
from nbexchange.db import translate_errors
from nbexchange.errors import (
    ConflictError,
    ExchangeError,
    Forbidden,
    Invalid,
    KeyReused,
    NotFound,
    Unavailable,
    UnsafeArchive,
)
from nbexchange.events.domain import (
    Actor,
    ArchiveRejected,
    Collected,
    DomainEvent,
    DueDateSet,
    ExtensionGranted,
    FeedbackFetched,
    FeedbackReleased,
    Fetched,
    Released,
    Submitted,
    Unreleased,
    assignment_stream,
    check_stream,
    student_stream,
)
from nbexchange.events.store import AppendRequest, RecordedEvent, request_fingerprint, same_request
from nbexchange.identity.base import User
from nbexchange.projections import NAMES, catch_up_all, checkpoints
from nbexchange.projections.assignments import course_releases, user_actions
from nbexchange.projections.collections import (
    get_submission,
    notebook_entry,
    submission_items_json,
)
from nbexchange.projections.feedback import student_feedback
from nbexchange.projections.history import course_history
from nbexchange.runtime import Runtime
from nbexchange.storage import BlobReader, StoredArchive
from nbexchange.workers.tasks import outcome_key

#: How often a write is decided again when a stream it depends on moved before its commit.
WRITE_ATTEMPTS = 5

#: How many assignments' live releases each process keeps decided (the least recently used go first).
DECISIONS_KEPT = 4096

D = TypeVar("D")


@dataclass(frozen=True)
class Assignment:
    """An assignment as its own stream in the log has it, at ``version``: what writes on it are decided on.

    ``release`` is the live ``released`` event (``None`` if never released or
    withdrawn); ``released`` the archives released since the last purge,
    which a purge names.
    """

    stream: str
    version: int
    release: RecordedEvent | None
    released: tuple[str, ...]
    #: The live release's check stream and its version when this was read (0 before the outcome, 1 after).
    check: tuple[str, int] | None = None

    def requires(self) -> tuple[tuple[str, int], ...]:
        """What a write decided on this assignment depends on: its stream and its release check's, as read."""
        mine = (self.stream, self.version)
        return (mine, self.check) if self.check is not None else (mine,)


class Decisions:
    """Live releases this process decided on, each kept until a write on it is refused by the append.

    A fetch or a submission decided on a kept release names, in its append's
    ``requires``, the versions it was decided on (the assignment's stream and
    the release check's stream): if either moved since (an unrelease, a new
    release, the check's outcome), the append refuses it and the write is
    decided again on the log, with nothing kept. So a kept decision is never
    wrong at commit, in any process; refusals are never kept.
    """

    def __init__(self, size: int = DECISIONS_KEPT) -> None:
        self._size = size
        self._kept: OrderedDict[tuple[int, str, str], Assignment] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, str, str]) -> Assignment | None:
        with self._lock:
            found = self._kept.get(key)
            if found is not None:
                self._kept.move_to_end(key)
            return found

    def keep(self, key: tuple[int, str, str], assignment: Assignment) -> None:
        with self._lock:
            self._kept[key] = assignment
            self._kept.move_to_end(key)
            while len(self._kept) > self._size:
                self._kept.popitem(last=False)

    def forget(self) -> None:
        """Drop everything kept: a write decided on it was refused at commit."""
        with self._lock:
            self._kept.clear()


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

    def __init__(self, runtime: Runtime, consistency_timeout: float = 10.0, max_clock_skew: float = 300.0) -> None:
        self.rt = runtime
        self.consistency_timeout = consistency_timeout
        self.max_clock_skew = max_clock_skew
        self.decisions = Decisions()

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

    # -- what a write is decided on ------------------------------------------
    #
    # Every write decides its preconditions on the log itself, never on a read
    # model that may lag: the assignment's own stream (its releases and
    # unreleases), the student's stream (their submissions), an archive
    # check's outcome by its key. A write that depends on a stream it does not
    # append to names that stream's version in ``requires``; the append is
    # refused if the stream moved meanwhile, and the write is decided again.

    def assignment(self, org_id: int, course_id: str, assignment_id: str) -> Assignment:
        """The assignment as its own stream in the log has it now."""
        stream = assignment_stream(org_id, course_id, assignment_id)
        version, release = 0, None
        released: list[str] = []
        for event in self.rt.store.read_stream(stream):
            version = event.version
            data = event.data
            if isinstance(data, Released):
                release = event
                if data.archive_sha256 not in released:
                    released.append(data.archive_sha256)
            elif isinstance(data, Unreleased):
                release = None
                if data.purge:
                    released.clear()
        return Assignment(stream, version, release, tuple(released))

    def _released(self, user: User, course_id: str, assignment_id: str) -> Assignment:
        """The assignment, if it is released now and its archive was not rejected.

        Kept per process (``Decisions``): a write decided on it requires what it
        was read from, so the append itself tells when it is out of date.
        """
        key = (user.org_id, course_id, assignment_id)
        kept = self.decisions.get(key)
        if kept is not None:
            return kept
        assignment = self._live_release(user, course_id, assignment_id)
        assert assignment.release is not None
        outcome = self.rt.store.by_idempotency_key(outcome_key(assignment.release.position))
        if outcome is not None and isinstance(outcome.data, ArchiveRejected):
            raise UnsafeArchive(f"The released archive was rejected: {outcome.data.reason}")
        check = check_stream(user.org_id, course_id, assignment_id, assignment.release.position)
        decided = dataclasses.replace(assignment, check=(check, 0 if outcome is None else outcome.version))
        self.decisions.keep(key, decided)
        return decided

    def _check_clock(self, timestamp: datetime) -> None:
        """``Invalid`` unless the client's timestamp is within ``max_clock_skew`` of the server's time."""
        skew = (timestamp - utcnow()).total_seconds()
        if abs(skew) > self.max_clock_skew:
            side = "ahead of" if skew > 0 else "behind"
            raise Invalid(
                f"The timestamp {format_timestamp(timestamp)} is {abs(skew):.0f} s {side} the exchange's clock; "
                f"at most {self.max_clock_skew:.0f} s are accepted. Check your computer's clock and submit again."
            )

    def _earlier(self, user: User, key: str | None) -> RecordedEvent | None:
        return self.rt.store.by_idempotency_key(_scoped_key(user, key)) if key else None

    def _replayed(self, user: User, key: str | None, event_type: str, fingerprint: str) -> Written | None:
        """The first answer to a retried request, before its preconditions are decided again.

        A retry must get the answer its first attempt got, not a conflict with
        itself (a stream version it moved) or a 404 (an assignment it withdrew);
        a key sent with a different request is refused (``KeyReused``).
        """
        earlier = self._earlier(user, key)
        if earlier is None:
            return None
        if not same_request(earlier, event_type, earlier.stream, fingerprint):
            raise KeyReused()
        return Written(earlier, duplicate=True)

    def _write(
        self,
        user: User,
        key: str | None,
        event_type: str,
        fingerprint: str,
        decide: Callable[[], D],
        append: Callable[[D], Written],
        decided: D | None = None,
        retry_conflicts: bool = True,
    ) -> Written:
        """Decide a write on the log and append it; decided again if a stream it depends on moved.

        ``decided`` is what ``prepare`` decided before the body arrived (the
        first attempt uses it). Writes on an assignment's own stream (release,
        unrelease) do not retry: two instructors' concurrent releases conflict.
        A retried request (its key was used) gets its first answer: from the
        append, which looks keys up in its batch, or, where the write is
        refused before or at the append, from the log by its key.
        """
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                state = decided if decided is not None and attempt == 1 else decide()
                return append(state)
            except ConflictError:
                self.decisions.forget()
                earlier = self._replayed(user, key, event_type, fingerprint)
                if earlier is not None:
                    return earlier
                if not retry_conflicts or attempt == WRITE_ATTEMPTS:
                    raise
            except Unavailable:
                raise
            except ExchangeError:
                earlier = self._replayed(user, key, event_type, fingerprint)
                if earlier is not None:
                    return earlier
                raise
        raise AssertionError("unreachable")

    def _append(
        self,
        user: User,
        event: DomainEvent,
        key: str | None,
        fingerprint: str | None = None,
        expected_version: int | None = None,
        requires: tuple[tuple[str, int], ...] = (),
    ) -> Written:
        scoped = _scoped_key(user, key) if key else None
        appended = self.rt.committer.append(
            AppendRequest(event, self.actor(user, event.course_id), expected_version, scoped, requires, fingerprint)
        )
        return Written(appended.event, duplicate=appended.duplicate)

    # -- writes ----------------------------------------------------------

    def may_release(self, user: User, course_id: str, assignment_id: str) -> Assignment:
        """Whether the user may release the assignment: decided before the upload is read."""
        self.instructor(user, course_id, "release assignments")
        return self.assignment(user.org_id, course_id, assignment_id)

    def release(
        self,
        user: User,
        course_id: str,
        assignment_id: str,
        notebooks: Sequence[str],
        upload: StoredArchive,
        key: str | None = None,
        decided: Assignment | None = None,
        due_date: datetime | None = None,
    ) -> Written:
        """Release an assignment's archive (with its due date, if given); a concurrent release conflicts."""
        event = Released(user.org_id, course_id, assignment_id, tuple(notebooks), upload.sha256, upload.size, due_date)
        fingerprint = request_fingerprint("release", **event.to_payload())
        return self._write(
            user,
            key,
            Released.TYPE,
            fingerprint,
            lambda: self.may_release(user, course_id, assignment_id),
            lambda a: self._append(user, event, key, fingerprint, expected_version=a.version),
            decided,
            retry_conflicts=False,
        )

    def unrelease(
        self, user: User, course_id: str, assignment_id: str, purge: bool = False, key: str | None = None
    ) -> Written:
        """Withdraw a released assignment; ``purge`` makes its archives collectable.

        No request deletes a stored archive: the blob collector removes the
        purged ones once no event owns them (a submission of the same bytes does).
        """
        fingerprint = request_fingerprint(
            "unrelease", org_id=user.org_id, course_id=course_id, assignment_id=assignment_id, purge=purge
        )

        def decide() -> Assignment:
            self.instructor(user, course_id, "unrelease assignments")
            return self._live_release(user, course_id, assignment_id)

        def append(a: Assignment) -> Written:
            purged = a.released if purge else ()
            event = Unreleased(user.org_id, course_id, assignment_id, purge=purge, purged_archives=purged)
            return self._append(user, event, key, fingerprint, expected_version=a.version)

        return self._write(user, key, Unreleased.TYPE, fingerprint, decide, append, retry_conflicts=False)

    def set_due_date(
        self, user: User, course_id: str, assignment_id: str, due_date: datetime | None, key: str | None = None
    ) -> Written:
        """Set (``None``: remove) a released assignment's due date; a concurrent change conflicts."""
        fingerprint = request_fingerprint(
            "due_date",
            org_id=user.org_id,
            course_id=course_id,
            assignment_id=assignment_id,
            due_date=format_iso(due_date) if due_date else None,
        )

        def decide() -> Assignment:
            self.instructor(user, course_id, "set due dates")
            return self._live_release(user, course_id, assignment_id)

        def append(a: Assignment) -> Written:
            event = DueDateSet(user.org_id, course_id, assignment_id, due_date)
            return self._append(user, event, key, fingerprint, expected_version=a.version)

        return self._write(user, key, DueDateSet.TYPE, fingerprint, decide, append, retry_conflicts=False)

    def grant_extension(
        self,
        user: User,
        course_id: str,
        assignment_id: str,
        student_id: str,
        due_date: datetime,
        key: str | None = None,
    ) -> Written:
        """Give one student their own due date for a released assignment."""
        fingerprint = request_fingerprint(
            "extension",
            org_id=user.org_id,
            course_id=course_id,
            assignment_id=assignment_id,
            student_id=student_id,
            due_date=format_iso(due_date),
        )

        def decide() -> Assignment:
            self.instructor(user, course_id, "grant extensions")
            return self._live_release(user, course_id, assignment_id)

        def append(a: Assignment) -> Written:
            event = ExtensionGranted(user.org_id, course_id, assignment_id, student_id, due_date)
            return self._append(user, event, key, fingerprint, requires=((a.stream, a.version),))

        return self._write(user, key, ExtensionGranted.TYPE, fingerprint, decide, append)

    def _live_release(self, user: User, course_id: str, assignment_id: str) -> Assignment:
        """The assignment, if it is released now; ``NotFound`` if not."""
        assignment = self.assignment(user.org_id, course_id, assignment_id)
        if assignment.release is None:
            raise NotFound(f"Assignment {assignment_id!r} is not released in course {course_id!r}.")
        return assignment

    def fetch(self, user: User, course_id: str, assignment_id: str, key: str | None = None) -> Download:
        """Record that a member fetched the released archive, and say where it is."""
        fingerprint = request_fingerprint("fetch", org_id=user.org_id, course_id=course_id, assignment_id=assignment_id)

        def decide() -> Assignment:
            self.member(user, course_id)
            return self._released(user, course_id, assignment_id)

        def append(a: Assignment) -> Written:
            assert a.release is not None
            sha = a.release.data.archive()
            assert sha is not None
            event = Fetched(user.org_id, course_id, assignment_id, user.name, a.release.position, sha)
            return self._append(user, event, key, fingerprint, requires=a.requires())

        def archive(a: Assignment) -> str | None:
            return a.release.data.archive() if a.release else None

        return self._download(user, key, Fetched.TYPE, fingerprint, decide, append, archive)

    def _download(
        self,
        user: User,
        key: str | None,
        event_type: str,
        fingerprint: str,
        decide: Callable[[], D],
        append: Callable[[D], Written],
        archive_of: Callable[[D], Any],
    ) -> Download:
        """``_write`` a download's event, opening its archive first: a store that cannot serve it records none."""
        opened: list[tuple[str, BlobReader]] = []

        def open_then_append(state: D) -> Written:
            sha = archive_of(state)
            opened.append((sha, self.rt.archives.open(sha)))
            return append(state)

        try:
            written = self._write(user, key, event_type, fingerprint, decide, open_then_append)
            sha = written.event.payload["archive_sha256"]
            if not opened or opened[-1][0] != sha:
                # A retried request's first answer, whose event was appended then (perhaps of another release).
                opened.append((sha, self.rt.archives.open(sha)))
            _, file = opened.pop()
            return Download(file, file.size, written.event)
        finally:
            for _, unused in opened:  # opened for an attempt that conflicted, or before a failure
                unused.close()

    def may_submit(
        self, user: User, course_id: str, assignment_id: str, timestamp: datetime, key: str | None = None
    ) -> Assignment | None:
        """Whether the user may submit now: decided before the upload is read.

        ``None`` for a retried request (its key was used): its first answer,
        or ``KeyReused``, is decided once the body's bytes are known.
        """
        try:
            return self._submittable(user, course_id, assignment_id, timestamp)
        except Unavailable:
            raise
        except ExchangeError:
            if self._earlier(user, key) is None:
                raise
            self.member(user, course_id)
            return None

    def may_submit_kept(self, user: User, course_id: str, assignment_id: str, timestamp: datetime) -> Assignment | None:
        """``may_submit``'s yes where giving it reads nothing: the release is kept (``Decisions``), the user a
        member of the course, the timestamp within the skew. Cheap enough for the event loop (no thread
        hand-off before the body); ``None`` where ``may_submit`` must decide, refusals included.
        """
        kept = self.decisions.get((user.org_id, course_id, assignment_id))
        if kept is None:
            return None
        try:
            self.member(user, course_id)
            self._check_clock(timestamp)
        except ExchangeError:
            return None
        return kept

    def _submittable(self, user: User, course_id: str, assignment_id: str, timestamp: datetime) -> Assignment:
        self.member(user, course_id)
        self._check_clock(timestamp)
        return self._released(user, course_id, assignment_id)

    def submit(
        self,
        user: User,
        course_id: str,
        assignment_id: str,
        timestamp: datetime,
        upload: StoredArchive,
        key: str | None = None,
        decided: Assignment | None = None,
    ) -> Written:
        """Record a submission of a released assignment; it stands only if the release still does at commit."""
        fingerprint = request_fingerprint(
            "submit",
            org_id=user.org_id,
            course_id=course_id,
            assignment_id=assignment_id,
            timestamp=format_iso(timestamp),
            archive_sha256=upload.sha256,
        )

        def append(a: Assignment) -> Written:
            assert a.release is not None
            notebooks = a.release.payload.get("notebooks", [])
            event = Submitted(
                user.org_id,
                course_id,
                assignment_id,
                user.name,
                timestamp=timestamp,
                archive_sha256=upload.sha256,
                archive_size=upload.size,
                notebooks=tuple(notebooks),
            )
            return self._append(user, event, key, fingerprint, requires=a.requires())

        return self._write(
            user,
            key,
            Submitted.TYPE,
            fingerprint,
            lambda: self._submittable(user, course_id, assignment_id, timestamp),
            append,
            decided,
        )

    def collect(self, user: User, course_id: str, assignment_id: str, path: str, key: str | None = None) -> Download:
        """Record that an instructor collected one submission, and say where its archive is."""
        fingerprint = request_fingerprint(
            "collect", org_id=user.org_id, course_id=course_id, assignment_id=assignment_id, path=path
        )

        def decide() -> dict[str, Any]:
            self.instructor(user, course_id, "collect submissions")
            submission = self._submission(user, course_id, assignment_id, path)
            outcome = self.rt.store.by_idempotency_key(outcome_key(submission["position"]))
            if outcome is not None and isinstance(outcome.data, ArchiveRejected):
                raise UnsafeArchive(f"This submission's archive was rejected: {outcome.data.reason}")
            return submission

        def append(submission: dict[str, Any]) -> Written:
            event = Collected(
                user.org_id,
                course_id,
                assignment_id,
                submission["student_id"],
                submission_position=submission["position"],
                archive_sha256=submission["archive_sha256"],
            )
            return self._append(user, event, key, fingerprint)

        return self._download(
            user, key, Collected.TYPE, fingerprint, decide, append, lambda submission: submission["archive_sha256"]
        )

    def _submission(self, user: User, course_id: str, assignment_id: str, path: str) -> dict[str, Any]:
        """The submission a ``path`` token names, found in the read model once it includes every committed event.

        Tokens are handed out by lists, so the read model has them almost
        always; only a miss brings it to the log's head first.
        """
        for attempt in (1, 2):
            with translate_errors(), self.rt.engine.connect() as conn:
                submission = get_submission(conn, user.org_id, course_id, assignment_id, path)
            if submission is not None:
                return submission
            if attempt == 1:
                self.catch_up_to(self.rt.store.head())
        raise NotFound(f"No submission {path!r} for assignment {assignment_id!r} in course {course_id!r}.")

    def may_release_feedback(
        self, user: User, course_id: str, assignment_id: str, student_id: str, timestamp: datetime
    ) -> RecordedEvent:
        """The student's submission that feedback is for, read from their stream: decided before the upload."""
        self.instructor(user, course_id, "release feedback")
        stream = student_stream(user.org_id, course_id, assignment_id, student_id)
        for event in self.rt.store.read_stream(stream):
            data = event.data
            if isinstance(data, Submitted) and data.timestamp == timestamp:
                return event
        raise NotFound(
            f"Student {student_id!r} has no submission of {assignment_id!r} at {format_timestamp(timestamp)}."
        )

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
        decided: RecordedEvent | None = None,
    ) -> Written:
        """Release feedback on one notebook of the student's submission made at ``timestamp``."""
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
        fingerprint = request_fingerprint("release_feedback", **event.to_payload())
        # A submission, once logged, stays: the decision cannot go stale.
        return self._write(
            user,
            key,
            FeedbackReleased.TYPE,
            fingerprint,
            lambda: self.may_release_feedback(user, course_id, assignment_id, student_id, timestamp),
            lambda _: self._append(user, event, key, fingerprint),
            decided,
        )

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
                        download.size,
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

    def head(self) -> int:
        """The position of the log's last committed event."""
        return self.rt.store.head()

    def catch_up_to(self, position: int) -> None:
        """Bring every read model to ``position`` in this process, whether or not a worker is running."""
        catch_up_all(self.rt.engine, until=position)

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
