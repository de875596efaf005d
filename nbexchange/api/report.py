"""``report``: one assignment's record per student, from the log, for the course's Instructors."""

from __future__ import annotations

from nbexchange.api.base import BaseHandler
from nbexchange.report import build_report


class ReportHandler(BaseHandler):
    route_name = "report"

    async def get(self) -> None:
        """On time, late or missing per student, with resubmissions, collections, feedback and clock skew."""
        course_id, assignment_id = self.id_param("course_id"), self.id_param("assignment_id")
        deadline = self.timestamp_param("deadline") if self.param("deadline", required=False) else None
        as_of = self.timestamp_param("as_of") if self.param("as_of", required=False) else None
        self.exchange.instructor(self.user, course_id, "read reports")
        report = await self.run(
            build_report,
            self.runtime.store,
            course_id,
            assignment_id,
            org_id=self.user.org_id,
            deadline=deadline,
            as_of=as_of,
            max_clock_skew=self.exchange.max_clock_skew,
        )
        self.answer({"value": report})


default_handlers = [(r"report", ReportHandler)]
