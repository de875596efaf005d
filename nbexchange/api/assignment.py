"""``assignment``: fetch (GET), release (POST) and unrelease (DELETE) one assignment."""

from __future__ import annotations

from datetime import datetime

from tornado import web

from nbexchange.api.uploads import UploadHandler
from nbexchange.clock import parse_timestamp
from nbexchange.errors import Invalid


@web.stream_request_body
class AssignmentHandler(UploadHandler):
    route_name = "assignment"
    file_field = "assignment"
    list_fields = ("notebooks", "duedate")

    async def get(self) -> None:
        """Download the released archive; appends ``fetched``."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        key = self.idempotency_key()
        await self.send_download(
            lambda: self.exchange.fetch(self.user, course_id, assignment_id, key), f"{assignment_id}.tar.gz"
        )

    async def authorize_upload(self) -> None:
        """An Instructor of the course; the assignment's stream as the release will expect it."""
        self.course_id, self.assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        self.key = self.idempotency_key()
        self.decided = await self.run(self.exchange.may_release, self.user, self.course_id, self.assignment_id)

    async def post(self) -> None:
        """Release the uploaded archive to the course; appends ``released``."""
        notebooks = self.form_list("notebooks")
        due_date = self.due_date()
        written = await self.with_stored_upload(
            lambda stored: self.exchange.release(
                self.user, self.course_id, self.assignment_id, notebooks, stored, self.key, self.decided, due_date
            )
        )
        self.answer({"note": "Released", "position": written.event.position}, status=200 if written.duplicate else 201)

    def due_date(self) -> datetime | None:
        """The release's ``duedate`` (query or form; nbgrader's format or ISO 8601), if sent."""
        if self.param("duedate", required=False) is not None:
            return self.timestamp_param("duedate")
        # The form's raw text: ``form_list`` holds ids to the id rule, which a time breaks.
        sent = self._lists["duedate"].values
        if not sent or not sent[0]:
            return None
        try:
            return parse_timestamp(sent[0].decode("utf-8"))
        except ValueError:  # UnicodeDecodeError included
            raise Invalid("The field 'duedate' is not a timestamp like '2026-01-31 23:59:59 UTC'.") from None

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
