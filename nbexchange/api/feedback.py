"""``feedback``: an instructor releases a notebook's feedback (POST); a student fetches theirs (GET)."""

from __future__ import annotations

from tornado import web

from nbexchange.api.uploads import UploadHandler


@web.stream_request_body
class FeedbackHandler(UploadHandler):
    route_name = "feedback"
    file_field = "feedback"
    gzip_required = False

    async def get(self) -> None:
        """The caller's own feedback on the assignment; appends ``feedback_fetched`` if there was any."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        self.exchange.member(self.user, course_id)
        position = await self.read_position()
        files, event = await self.run(
            self.exchange.fetch_feedback, self.user, course_id, assignment_id, self.idempotency_key()
        )
        self.answer({"feedback": files, "position": event.position if event else position})

    async def authorize_upload(self) -> None:
        """An Instructor of the course; the student's submission at ``timestamp`` exists in the log."""
        self.course_id, self.assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        self.notebook_id, self.student_id = self.id_param("notebook"), self.id_param("student")
        self.timestamp = self.timestamp_param()
        self.checksum = self.id_param("checksum")
        self.key = self.idempotency_key()
        self.decided = await self.run(
            self.exchange.may_release_feedback,
            self.user,
            self.course_id,
            self.assignment_id,
            self.student_id,
            self.timestamp,
        )

    async def post(self) -> None:
        """Release feedback on one notebook of the submission made at ``timestamp``."""
        stored = await self.stored_upload()
        written = await self.run(
            self.exchange.release_feedback,
            self.user,
            self.course_id,
            self.assignment_id,
            self.notebook_id,
            self.student_id,
            self.timestamp,
            self.checksum,
            stored,
            self.key,
            self.decided,
        )
        self.answer(
            {"note": "Feedback released", "position": written.event.position}, status=200 if written.duplicate else 201
        )


default_handlers = [(r"feedback", FeedbackHandler)]
