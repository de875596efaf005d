"""Submit an assignment: upload the student's folder, stamped and with a secret, and cache a copy."""

import os
import secrets

from nbgrader.exchange.abc import ExchangeSubmit as ABCExchangeSubmit

from .exchange import Exchange, copy_tree
from .transfer import Upload


class ExchangeSubmit(Exchange, ABCExchangeSubmit):
    """``nbgrader submit``: writes ``timestamp.txt`` and ``submission_secret.txt`` as nbgrader does."""

    def init_src(self):
        root = self.assignment_root(self.coursedir.course_id, self.coursedir.assignment_id)
        other_path = os.path.join(self.coursedir.course_id, "*") if self.path_includes_course else "*"
        self.src_path = os.path.abspath(os.path.join(self.assignment_dir, root))
        self.coursedir.assignment_id = os.path.split(self.src_path)[-1]
        if not os.path.isdir(self.src_path):
            self.not_found(self.src_path, os.path.abspath(other_path))

    def fail(self, msg):
        """Fail, saying first that nothing was submitted: a student must never believe otherwise."""
        what = " ".join(filter(None, [self.coursedir.course_id, self.coursedir.assignment_id])) or "The assignment"
        super().fail(f"{what} was NOT submitted. {msg}")

    def init_dest(self):
        self.require_course()
        self.require_plain_student_id()

    def check_filename_diff(self, released, submitted):
        """Warn about missing or extra notebooks; with ``--strict``, fail on missing ones."""
        release_diff = ["{}: {}".format(name, "FOUND" if name in submitted else "MISSING") for name in released]
        submitted_diff = ["{}: {}".format(name, "OK" if name in released else "EXTRA") for name in submitted]
        missing = any(name not in submitted for name in released)
        extra = any(name not in released for name in submitted)
        if not (missing or extra):
            return
        diff_msg = "Expected:\n\t{}\nSubmitted:\n\t{}".format("\n\t".join(release_diff), "\n\t".join(submitted_diff))
        if missing and self.strict:
            self.fail(f"There are missing notebooks for the submission:\n{diff_msg}")
        self.log.warning(
            "Possible missing notebooks and/or extra notebooks submitted for assignment "
            f"{self.coursedir.assignment_id}:\n{diff_msg}"
        )

    def copy_files(self):
        course_id, assignment_id = self.coursedir.course_id, self.coursedir.assignment_id
        release = self.released_item(course_id, assignment_id)
        if release is None:
            self.fail(f"Assignment not found: {course_id} {assignment_id} is not released.")
        released = sorted("{}.ipynb".format(nb["notebook_id"]) for nb in release.get("notebooks", []))
        stamps = {"timestamp.txt": self.timestamp, "submission_secret.txt": secrets.token_hex(64)}

        self.log.info(f"Source: {self.src_path}")
        self.log.info(f"Destination: {self.service_url}")
        with self.packed(self.src_path, stamps) as (archive, files):
            self.check_filename_diff(released, sorted(name for name in files if name.endswith(".ipynb")))
            self.api_request(
                "POST",
                "submission",
                f"Submitting {course_id} {assignment_id}",
                {"course_id": course_id, "assignment_id": assignment_id, "timestamp": self.timestamp},
                upload=Upload("assignment", archive, f"{assignment_id}.tar.gz"),
            )

        # Cached only once the service holds the submission: the cache is what
        # fetch_feedback checks feedback against, and must not show a failed submit.
        # Named as the service knows this user, so that list --cached finds it again.
        student_id = release.get("student_id") or self.student_name()
        self.cache_path = os.path.join(self.cache, course_id, f"{student_id}+{assignment_id}+{self.timestamp}")
        copy_tree(self.src_path, self.cache_path, self.ignore())
        for name, text in stamps.items():
            with open(os.path.join(self.cache_path, name), "w") as fh:
                fh.write(text)
        self.log.info(f"Submitted as: {course_id} {assignment_id} {self.timestamp}")
