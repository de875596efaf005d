"""Release an assignment: upload the instructor's release folder to the service."""

import glob
import os
from datetime import timezone

from nbgrader.exchange.abc import ExchangeReleaseAssignment as ABCExchangeReleaseAssignment

from .exchange import Exchange
from .transfer import Upload


class ExchangeReleaseAssignment(Exchange, ABCExchangeReleaseAssignment):
    """``nbgrader release_assignment``: one upload, refused if already released unless ``--force``."""

    def init_src(self):
        self.src_path = self.coursedir.format_path(self.coursedir.release_directory, ".", self.coursedir.assignment_id)
        if not os.path.isdir(self.src_path):
            source = self.coursedir.format_path(self.coursedir.source_directory, ".", self.coursedir.assignment_id)
            if os.path.isdir(source):
                # Looks like the instructor forgot to assign
                self.fail(
                    f"Assignment found in '{source}' but not '{self.src_path}', "
                    "run `nbgrader generate_assignment` first."
                )
            self.not_found(self.src_path, self.coursedir.format_path(self.coursedir.release_directory, ".", "*"))

    def init_dest(self):
        self.require_course()

    def copy_files(self):
        course_id, assignment_id = self.coursedir.course_id, self.coursedir.assignment_id
        if self.released_item(course_id, assignment_id) is not None:
            if not self.force:
                self.fail(f"Destination already exists, add --force to overwrite: {course_id} {assignment_id}")
            self.log.info(f"Overwriting files: {course_id} {assignment_id}")
        notebooks = sorted(
            os.path.splitext(os.path.basename(path))[0] for path in glob.glob(os.path.join(self.src_path, "*.ipynb"))
        )
        fields = [("notebooks", notebook) for notebook in notebooks]
        duedate = self.gradebook_duedate()
        if duedate is not None:
            # The gradebook keeps naive UTC; the exchange records it with the release.
            utc = duedate.replace(tzinfo=timezone.utc) if duedate.tzinfo is None else duedate
            fields.append(("duedate", utc.isoformat()))
        self.log.info(f"Source: {self.src_path}")
        self.log.info(f"Destination: {self.service_url}")
        with self.packed(self.src_path) as (archive, _):
            self.api_request(
                "POST",
                "assignment",
                f"Releasing {course_id} {assignment_id}",
                {"course_id": course_id, "assignment_id": assignment_id},
                upload=Upload(
                    "assignment",
                    archive,
                    f"{assignment_id}.tar.gz",
                    fields=fields,
                ),
            )
        self.log.info(f"Released as: {course_id} {assignment_id}")
