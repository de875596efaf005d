"""``collections`` and ``collection``: list an assignment's submissions; download one."""

from __future__ import annotations

from nbexchange.api.base import BaseHandler


class CollectionsHandler(BaseHandler):
    route_name = "collections"
    lists = True

    async def get(self) -> None:
        """Every submission of the assignment (or of ``user_id``), oldest first."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        student_id = self.optional_id("user_id")
        self.exchange.instructor(self.user, course_id, "list submissions")
        position = await self.read_position()
        items = await self.run(self.exchange.collections, self.user, course_id, assignment_id, student_id)
        self.answer({"position": position}, value_json=items)


class CollectionHandler(BaseHandler):
    route_name = "collection"

    async def get(self) -> None:
        """Download one submission by its ``path`` token; appends ``collected``."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        path = self.id_param("path")
        key = self.idempotency_key()
        await self.send_download(
            lambda: self.exchange.collect(self.user, course_id, assignment_id, path, key), f"{assignment_id}.tar.gz"
        )


default_handlers = [(r"collections", CollectionsHandler), (r"collection", CollectionHandler)]
