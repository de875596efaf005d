"""``assignment``: fetch (GET), release (POST) and unrelease (DELETE) one assignment."""

from __future__ import annotations

from tornado import web

from nbexchange.api.uploads import UploadHandler


@web.stream_request_body
class AssignmentHandler(UploadHandler):
    route_name = "assignment"
    file_field = "assignment"
    list_fields = ("notebooks",)

    async def get(self) -> None:
        """Download the released archive; appends ``fetched``."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        download = await self.run(self.exchange.fetch, self.user, course_id, assignment_id, self.idempotency_key())
        await self.send_download(download, f"{assignment_id}.tar.gz")

    async def authorize_upload(self) -> None:
        """An Instructor of the course; the assignment's stream as the release will expect it."""
        self.course_id, self.assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        self.key = self.idempotency_key()
        self.decided = await self.run(self.exchange.may_release, self.user, self.course_id, self.assignment_id)

    async def post(self) -> None:
        """Release the uploaded archive to the course; appends ``released``."""
        notebooks = self.form_list("notebooks")
        stored = await self.stored_upload()
        written = await self.run(
            self.exchange.release,
            self.user,
            self.course_id,
            self.assignment_id,
            notebooks,
            stored,
            self.key,
            self.decided,
        )
        self.answer({"note": "Released", "position": written.event.position}, status=200 if written.duplicate else 201)

    async def delete(self) -> None:
        """Withdraw the assignment; ``purge=true`` also removes its stored archive (after the event)."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        purge = (self.param("purge", required=False) or "").lower() in ("1", "true", "yes")
        written = await self.run(
            self.exchange.unrelease, self.user, course_id, assignment_id, purge, self.idempotency_key()
        )
        note = "Unreleased and purged" if purge else "Unreleased"
        self.answer({"note": note, "position": written.event.position})


default_handlers = [(r"assignment", AssignmentHandler)]
