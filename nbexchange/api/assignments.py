"""``assignments``: the course's released assignments and the caller's own actions on them."""

from __future__ import annotations

from nbexchange.api.base import BaseHandler


class AssignmentsHandler(BaseHandler):
    route_name = "assignments"
    lists = True

    async def get(self) -> None:
        """List items for the caller: each released assignment, and each of their own actions."""
        course_id = self.id_param("course_id")
        self.exchange.member(self.user, course_id)
        position = await self.read_position()
        items = await self.run(self.exchange.assignments, self.user, course_id)
        self.answer({"value": items, "position": position})


default_handlers = [(r"assignments", AssignmentsHandler)]
