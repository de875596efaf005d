"""``due_date`` and ``extension``: an assignment's due date and one student's own, kept in the log."""

from __future__ import annotations

from nbexchange.api.base import BaseHandler


class DueDateHandler(BaseHandler):
    route_name = "due_date"

    async def post(self) -> None:
        """Set the assignment's due date (``duedate``, nbgrader's format or ISO 8601); appends ``due_date_set``."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        due_date = self.timestamp_param("duedate")
        written = await self.run(
            self.exchange.set_due_date, self.user, course_id, assignment_id, due_date, self.idempotency_key()
        )
        self.answer({"note": "Due date set", "position": written.event.position}, 200 if written.duplicate else 201)

    async def delete(self) -> None:
        """Remove the assignment's due date; appends ``due_date_set`` with none."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        written = await self.run(
            self.exchange.set_due_date, self.user, course_id, assignment_id, None, self.idempotency_key()
        )
        self.answer({"note": "Due date removed", "position": written.event.position})


class ExtensionHandler(BaseHandler):
    route_name = "extension"

    async def post(self) -> None:
        """Give ``student_id`` their own due date (``duedate``); appends ``extension_granted``."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        student_id, due_date = self.id_param("student_id"), self.timestamp_param("duedate")
        written = await self.run(
            self.exchange.grant_extension,
            self.user,
            course_id,
            assignment_id,
            student_id,
            due_date,
            self.idempotency_key(),
        )
        self.answer(
            {"note": "Extension granted", "position": written.event.position}, 200 if written.duplicate else 201
        )


default_handlers = [(r"due_date", DueDateHandler), (r"extension", ExtensionHandler)]
