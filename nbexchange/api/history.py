"""``history`` and ``events``: the caller's view of the log, and raw events for auditors."""

from __future__ import annotations

from nbexchange.api.base import BaseHandler
from nbexchange.errors import Invalid
from nbexchange.events.domain import EVENT_TYPES


class HistoryHandler(BaseHandler):
    route_name = "history"
    lists = True

    async def get(self) -> None:
        """The caller's actions (all actions, for an Instructor), grouped by course and assignment."""
        course_id = self.optional_id("course_id")
        action = self.param("action", required=False)
        if action is not None and action not in EVENT_TYPES:
            raise Invalid(f"Unknown action {action!r}; one of: {', '.join(EVENT_TYPES)}.")
        if course_id:
            self.exchange.member(self.user, course_id)
        position = await self.read_position()
        value = await self.run(self.exchange.history, self.user, course_id, action)
        self.answer({"value": value, "position": position})


class EventsHandler(BaseHandler):
    route_name = "events"
    lists = True

    async def get(self) -> None:
        """A page of a course's raw events with their hashes: ``after`` a position, at most ``limit``."""
        course_id = self.id_param("course_id")
        assignment_id = self.optional_id("assignment_id")
        after = self.int_param("after", 0)
        limit = self.int_param("limit", 100, minimum=1, maximum=1000)
        self.exchange.instructor(self.user, course_id, "read the course's raw events")
        events = await self.run(self.exchange.events, self.user, course_id, after, limit, assignment_id)
        self.answer({"value": events, "next_after": events[-1]["position"] if events else after})


default_handlers = [(r"history", HistoryHandler), (r"events", EventsHandler)]
