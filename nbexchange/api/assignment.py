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
        self.exchange.member(self.user, course_id)
        await self.wait_for_position()
        download = await self.run(self.exchange.fetch, self.user, course_id, assignment_id, self.idempotency_key())
        await self.send_download(download, f"{assignment_id}.tar.gz")

    async def post(self) -> None:
        """Release the uploaded archive to the course; appends ``released``."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        self.exchange.instructor(self.user, course_id, "release assignments")
        key = self.idempotency_key()
        notebooks = self.form_list("notebooks")
        for notebook in notebooks:
            self.check_id("notebooks", notebook)
        stored = await self.stored_upload()
        written = await self.run(self.exchange.release, self.user, course_id, assignment_id, notebooks, stored, key)
        self.answer({"note": "Released", "position": written.event.position}, status=200 if written.duplicate else 201)

    async def delete(self) -> None:
        """Withdraw the assignment; ``purge=true`` also removes its stored archive (after the event)."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        purge = (self.param("purge", required=False) or "").lower() in ("1", "true", "yes")
        self.exchange.instructor(self.user, course_id, "unrelease assignments")
        await self.wait_for_position()
        written = await self.run(
            self.exchange.unrelease, self.user, course_id, assignment_id, purge, self.idempotency_key()
        )
        note = "Unreleased and purged" if purge else "Unreleased"
        self.answer({"note": note, "position": written.event.position})


default_handlers = [(r"assignment", AssignmentHandler)]
