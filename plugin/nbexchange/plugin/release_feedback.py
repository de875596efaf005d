"""Release feedback: upload each student's feedback html, tied to the submission it was made from."""

import glob
import os
import re

from nbgrader.exchange.abc import ExchangeReleaseFeedback as ABCExchangeReleaseFeedback
from nbgrader.utils import notebook_hash

from .exchange import Exchange
from .transfer import Upload


class ExchangeReleaseFeedback(Exchange, ABCExchangeReleaseFeedback):
    """``nbgrader release_feedback``: one upload per notebook, keyed by the submission's timestamp."""

    def init_src(self):
        student_id = self.coursedir.student_id if self.coursedir.student_id else "*"
        self.src_path = self.coursedir.format_path(
            self.coursedir.feedback_directory, student_id, self.coursedir.assignment_id
        )

    def init_dest(self):
        self.require_course()

    def copy_files(self):
        course_id, assignment_id = self.coursedir.course_id, self.coursedir.assignment_id
        excluded = set(filter(None, self.coursedir.student_id_exclude.split(",")))
        regexp = re.escape(os.path.sep).join(
            [
                self.coursedir.format_path(
                    self.coursedir.feedback_directory, "(?P<student_id>.*)", assignment_id, escape=True
                ),
                "(?P<notebook_id>.*).html",
            ]
        )
        html_files = sorted(glob.glob(os.path.join(self.src_path, "*.html")))
        if not html_files:
            self.log.warning(f"No feedback to release for '{assignment_id}' in {self.src_path}")
        failed = []
        for html_file in html_files:
            match = re.match(regexp, html_file)
            if match is None:
                self.log.error("Could not match '%s' with regexp '%s'", html_file, regexp)
                continue
            student_id, notebook_id = match.group("student_id"), match.group("notebook_id")
            if student_id in excluded:
                self.log.debug(f"Skipping student '{student_id}'")
                continue

            feedback_dir = os.path.dirname(html_file)
            try:
                with open(os.path.join(feedback_dir, "timestamp.txt")) as fh:
                    timestamp = fh.read().strip()
                with open(os.path.join(feedback_dir, "submission_secret.txt")) as fh:
                    secret = fh.read()
            except OSError as e:
                # Without them the feedback cannot be tied to a submission; the others still go.
                self.log.error("Cannot release feedback for student '%s': %s", student_id, e)
                failed.append(html_file)
                continue

            where = f"'{course_id}/{assignment_id}/{notebook_id}'"
            self.log.info(f"Releasing feedback for student '{student_id}' on assignment {where} ({timestamp})")
            params = {
                "course_id": course_id,
                "assignment_id": assignment_id,
                "notebook": notebook_id,
                "student": student_id,
                "timestamp": timestamp,
                "checksum": notebook_hash(secret=secret, notebook_id=notebook_id),
            }
            action = f"Releasing feedback for {student_id} on {course_id}/{assignment_id}/{notebook_id}"
            self.api_request(
                "POST",
                "feedback",
                action,
                params,
                upload=Upload("feedback", html_file, f"{notebook_id}.html", "text/html"),
            )
            self.log.info(f"Feedback released to: {course_id} {assignment_id} {student_id} {notebook_id}")
        if failed:
            self.fail("Feedback not released for: {}".format(", ".join(failed)))
