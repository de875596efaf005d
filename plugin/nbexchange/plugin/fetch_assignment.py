"""Fetch an assignment: download the released archive into the student's folder."""

import os
import shutil

from nbgrader.exchange.abc import ExchangeFetchAssignment as ABCExchangeFetchAssignment

from .exchange import Exchange, copy_tree
from .transfer import copy_missing


class ExchangeFetchAssignment(Exchange, ABCExchangeFetchAssignment):
    """``nbgrader fetch_assignment``: refuses an existing copy; ``--replace`` restores only missing files."""

    def init_src(self):
        self.require_course()
        self.src_path = f"{self.service_url} {self.coursedir.course_id} {self.coursedir.assignment_id}"

    def init_dest(self):
        root = self.assignment_root(self.coursedir.course_id, self.coursedir.assignment_id)
        self.dest_path = os.path.abspath(os.path.join(self.assignment_dir, root))
        if os.path.isdir(self.dest_path) and not self.replace_missing_files:
            self.fail(f"You already have a copy of the assignment in this directory: {root}")

    def copy_files(self):
        course_id, assignment_id = self.coursedir.course_id, self.coursedir.assignment_id
        self.log.info(f"Source: {self.src_path}")
        self.log.info(f"Destination: {self.dest_path}")
        params = {"course_id": course_id, "assignment_id": assignment_id}
        with self.downloaded("assignment", params, f"Fetching {course_id} {assignment_id}") as folder:
            ignore = shutil.ignore_patterns(*self.coursedir.ignore)
            if os.path.isdir(self.dest_path):
                copy_missing(folder, self.dest_path, ignore, self.log)
            else:
                copy_tree(folder, self.dest_path, ignore)
        self.log.info(f"Fetched as: {course_id} {assignment_id}")
