"""Collect submissions: download each student's chosen submission into the course's submitted folder."""

import fnmatch
import os
import shutil
from collections import defaultdict

from nbgrader.exchange.abc import ExchangeCollect as ABCExchangeCollect
from nbgrader.utils import parse_utc

from .exchange import Exchange, copy_tree


class ExchangeCollect(Exchange, ABCExchangeCollect):
    """``nbgrader collect``: the newest submission per student, or with ``--before-duedate`` the last on time."""

    def init_src(self):
        self.require_course()
        course_id, assignment_id = self.coursedir.course_id, self.coursedir.assignment_id
        pattern = self.coursedir.student_id or "*"
        params = {"course_id": course_id, "assignment_id": assignment_id}
        if not any(char in pattern for char in "*?["):
            params["user_id"] = pattern
        answer = self.api_request(
            "GET", "collections", f"Listing the submissions of {course_id} {assignment_id}", params
        )
        by_student = defaultdict(list)
        for item in self.without_rejected(answer.get("value", [])):
            if fnmatch.fnmatchcase(item["student_id"], pattern):
                by_student[item["student_id"]].append(dict(item, parsed_timestamp=parse_utc(item["timestamp"])))

        self.duedate = self.gradebook_duedate() if self.before_duedate else None
        self.src_records = [self._choose(records) for _, records in sorted(by_student.items())]

    def _choose(self, records):
        """The newest record, or with a due date the newest one on time (the newest if none is)."""
        records = sorted(records, key=lambda record: record["parsed_timestamp"], reverse=True)
        if self.duedate is not None:
            on_time = [record for record in records if record["parsed_timestamp"] <= self.duedate]
            if on_time:
                return on_time[0]
        return records[0]

    def copy_files(self):
        course_id, assignment_id = self.coursedir.course_id, self.coursedir.assignment_id
        if not self.src_records:
            self.log.warning(f"No submissions of '{assignment_id}' for course '{course_id}' to collect")
        else:
            self.log.info(
                f"Processing {len(self.src_records)} submissions of '{assignment_id}' for course '{course_id}'"
            )

        for record in self.src_records:
            student_id = record["student_id"]
            dest_path = self.coursedir.format_path(self.coursedir.submitted_directory, student_id, assignment_id)
            updating = False
            if os.path.isdir(dest_path):
                existing = self.coursedir.get_existing_timestamp(dest_path)
                newer = existing is None or record["parsed_timestamp"] > existing
                updating = (self.update and newer) or (self.before_duedate and existing != record["parsed_timestamp"])
                if not updating:
                    if self.update:
                        self.log.info(f"No newer submission to collect: {student_id} {assignment_id}")
                    else:
                        self.log.info(
                            f"Submission already exists, use --update to update: {student_id} {assignment_id}"
                        )
                    continue

            if updating:
                self.log.info(f"Updating submission: {student_id} {assignment_id}")
            else:
                self.log.info(f"Collecting submission: {student_id} {assignment_id}")
            self._download(record, dest_path, updating)

    def _download(self, record, dest_path, replace):
        params = {
            "course_id": self.coursedir.course_id,
            "assignment_id": self.coursedir.assignment_id,
            "path": record["path"],
        }
        action = f"Collecting {record['student_id']}'s {self.coursedir.assignment_id}"
        with self.downloaded("collection", params, action) as folder:
            # The service's timestamp is the one it accepted, so autograde's lateness is
            # measured by it rather than by whatever the archive says.
            with open(os.path.join(folder, "timestamp.txt"), "w") as fh:
                fh.write(record["timestamp"])
            if replace:
                shutil.rmtree(dest_path)
            copy_tree(folder, dest_path, self.ignore())
