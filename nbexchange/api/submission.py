"""``submission``: a student's upload of their work."""

from __future__ import annotations

from tornado import web

from nbexchange.api.uploads import UploadHandler


@web.stream_request_body
class SubmissionHandler(UploadHandler):
    route_name = "submission"
    file_field = "assignment"

    async def post(self) -> None:
        """Accept a submission; appends ``submitted`` once the archive is durably stored."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        timestamp = self.timestamp_param()
        key = self.idempotency_key()
        self.exchange.member(self.user, course_id)
        stored = await self.stored_upload()
        written = await self.run(self.exchange.submit, self.user, course_id, assignment_id, timestamp, stored, key)
        self.answer({"note": "Submitted", "position": written.event.position}, status=200 if written.duplicate else 201)


default_handlers = [(r"submission", SubmissionHandler)]
