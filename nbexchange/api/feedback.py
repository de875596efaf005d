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

    async def post(self) -> None:
        """Release feedback on one notebook of the submission made at ``timestamp``."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        notebook_id, student_id = self.id_param("notebook"), self.id_param("student")
        timestamp = self.timestamp_param()
        checksum = self.id_param("checksum")
        key = self.idempotency_key()
        self.exchange.instructor(self.user, course_id, "release feedback")
        await self.wait_for_position()
        stored = await self.stored_upload()
        written = await self.run(
            self.exchange.release_feedback,
            self.user,
            course_id,
            assignment_id,
            notebook_id,
            student_id,
            timestamp,
            checksum,
            stored,
            key,
        )
        self.answer(
            {"note": "Feedback released", "position": written.event.position}, status=200 if written.duplicate else 201
        )


default_handlers = [(r"feedback", FeedbackHandler)]
