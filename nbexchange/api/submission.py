"""``submission``: a student's upload of their work."""

from __future__ import annotations

from tornado import web

from nbexchange.api.uploads import UploadHandler


@web.stream_request_body
class SubmissionHandler(UploadHandler):
    route_name = "submission"
    file_field = "assignment"

    async def authorize_upload(self) -> None:
        """A member of the course, the assignment released now, the timestamp within the clock skew."""
        self.course_id, self.assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        self.timestamp = self.timestamp_param()
        self.key = self.idempotency_key()
        # Kept releases answer on the loop; anything else is decided in a thread (it reads the log).
        self.decided = self.exchange.may_submit_kept(
            self.user, self.course_id, self.assignment_id, self.timestamp
        ) or await self.run(
            self.exchange.may_submit, self.user, self.course_id, self.assignment_id, self.timestamp, self.key
        )

    async def post(self) -> None:
        """Accept a submission; appends ``submitted`` once the archive is durably stored."""
        written = await self.with_stored_upload(
            lambda stored: self.exchange.submit(
                self.user, self.course_id, self.assignment_id, self.timestamp, stored, self.key, self.decided
            )
        )
        self.answer({"note": "Submitted", "position": written.event.position}, status=200 if written.duplicate else 201)


default_handlers = [(r"submission", SubmissionHandler)]
