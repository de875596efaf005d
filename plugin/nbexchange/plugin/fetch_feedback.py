"""Fetch feedback: write each released feedback html under the timestamp of the submission it is for."""

import base64
import binascii
import glob
import os

from nbgrader.exchange.abc import ExchangeFetchFeedback as ABCExchangeFetchFeedback
from nbgrader.utils import notebook_hash

from .exchange import Exchange


class ExchangeFetchFeedback(Exchange, ABCExchangeFetchFeedback):
    """``nbgrader fetch_feedback``: lands in ``<assignment>/feedback/<timestamp>/<notebook>.html``."""

    def init_src(self):
        self.require_course()
        self.require_plain_student_id()
        self.src_path = f"{self.service_url} {self.coursedir.course_id} {self.coursedir.assignment_id}"

    def init_dest(self):
        root = self.assignment_root(self.coursedir.course_id, self.coursedir.assignment_id)
        self.dest_path = os.path.abspath(os.path.join(self.assignment_dir, root, "feedback"))

    def cached_submissions(self):
        """This assignment's submissions in the local cache: timestamp -> (secret or None, notebook ids)."""
        pattern = os.path.join(self.cache, self.coursedir.course_id, f"*+{self.coursedir.assignment_id}+*")
        found = {}
        for path in glob.glob(pattern):
            timestamp = os.path.basename(path).rsplit("+", 1)[-1]
            secret = None
            if os.path.isfile(os.path.join(path, "submission_secret.txt")):
                with open(os.path.join(path, "submission_secret.txt")) as fh:
                    secret = fh.read()
            notebooks = sorted(
                os.path.splitext(os.path.basename(nb))[0] for nb in glob.glob(os.path.join(path, "*.ipynb"))
            )
            found[timestamp] = (secret, notebooks)
        return found

    def copy_files(self):
        course_id, assignment_id = self.coursedir.course_id, self.coursedir.assignment_id
        self.log.info(f"Source: {self.src_path}")
        self.log.info(f"Destination: {self.dest_path}")
        answer = self.api_request(
            "GET",
            "feedback",
            f"Fetching feedback for {course_id} {assignment_id}",
            {"course_id": course_id, "assignment_id": assignment_id},
            write=True,  # the service records the fetch
        )
        cached = self.cached_submissions()
        fetched = set()
        for item in answer.get("feedback", []):
            notebook_id = os.path.splitext(os.path.basename(item.get("filename", "")))[0]
            timestamp = item.get("timestamp", "")
            where = f"'{course_id}/{assignment_id}/{notebook_id}' submitted at {timestamp}"
            if not notebook_id or not _is_plain_name(timestamp):
                self.log.warning("Skipping feedback the exchange sent with a bad name or timestamp: %s", where)
                continue
            secret = cached.get(timestamp, (None, []))[0]
            if secret is not None and notebook_hash(secret=secret, notebook_id=notebook_id) != item.get("checksum"):
                # The checksum ties feedback to the submission's secret: a mismatch means
                # it was made from some other submission, which must not land here.
                self.log.warning("Skipping feedback that does not match your submission: %s", where)
                continue
            try:
                content = base64.b64decode(item.get("content", ""), validate=True)
            except (binascii.Error, ValueError):
                self.fail(f"Fetching feedback failed: the exchange sent unreadable content for {where}")
            self.log.info(f"Found feedback for {where}")
            html_file = os.path.join(self.dest_path, timestamp, notebook_id + ".html")
            _write_atomically(html_file, content)
            fetched.add((timestamp, notebook_id))
            self.log.info(f"Fetched feedback: {html_file}")

        for timestamp, (_, notebooks) in sorted(cached.items()):
            for notebook_id in notebooks:
                if (timestamp, notebook_id) not in fetched:
                    where = f"'{course_id}/{assignment_id}/{notebook_id}' submitted at {timestamp}"
                    self.log.warning(f"Could not find feedback for {where}")


def _is_plain_name(name):
    """Whether ``name`` can be one folder's name: the service's timestamp becomes one."""
    return bool(name) and name not in (".", "..") and "/" not in name and os.sep not in name and "\0" not in name


def _write_atomically(path, content):
    # A reader (the assignment list) sees the old feedback or the new, never half of it.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = path + ".part"
    with open(partial, "wb") as fh:
        fh.write(content)
    os.replace(partial, path)
