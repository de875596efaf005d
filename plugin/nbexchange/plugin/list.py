"""List (or remove) released assignments and submissions, in the structures nbgrader's own exchange returns."""

import fnmatch
import glob
import os
import shutil

from nbgrader.exchange.abc import ExchangeList as ABCExchangeList

from .exchange import Exchange


class ExchangeList(Exchange, ABCExchangeList):
    """``nbgrader list``: released by default, ``--inbound`` (all students') or ``--cached`` (one's own) submissions."""

    def _matches(self, item):
        return fnmatch.fnmatchcase(item.get("assignment_id", ""), self.coursedir.assignment_id or "*")

    def _student_pattern(self):
        return self.coursedir.student_id or "*"

    # -- what there is ----------------------------------------------------------------------

    def parse_assignments(self):
        """The assignments to list: released ones, or submissions grouped by course, student and assignment."""
        if self.inbound:
            return _grouped(self._inbound_submissions())
        if self.cached:
            return _grouped(self._own_submissions())
        return self._released()

    def _released(self):
        assignments = []
        for course_id in self.user_courses():
            latest = {}
            for item in self.service_items(course_id):
                if item.get("status") == "released" and self._matches(item):
                    known = latest.get(item["assignment_id"])
                    if known is None or (item.get("timestamp") or "") > (known.get("timestamp") or ""):
                        latest[item["assignment_id"]] = item
            for assignment_id, item in sorted(latest.items()):
                assignments.append(self._released_info(course_id, assignment_id, item))
        return assignments

    def _released_info(self, course_id, assignment_id, item):
        info = {"course_id": course_id, "assignment_id": assignment_id}
        local = os.path.join(self.assignment_dir, self.assignment_root(course_id, assignment_id))
        if os.path.exists(local):
            info["status"] = "fetched"
            info["path"] = os.path.abspath(local)
            paths = sorted(glob.glob(os.path.join(info["path"], "*.ipynb")))
            notebooks = [{"notebook_id": _stem(path), "path": os.path.abspath(path)} for path in paths]
        else:
            info["status"] = "released"
            info["path"] = item.get("path") or ""
            notebooks = [
                {"notebook_id": nb["notebook_id"], "path": "{}.ipynb".format(nb["notebook_id"])}
                for nb in item.get("notebooks", [])
            ]
        if not notebooks:
            self.log.warning("No notebooks found in {}".format(info["path"] or f"{course_id} {assignment_id}"))
        info["notebooks"] = notebooks
        if self.remove:
            info["status"] = "removed"
        return info

    def _own_submissions(self):
        infos = []
        for course_id in self.user_courses():
            for item in self.service_items(course_id):
                student_id = item.get("student_id") or self.student_name()
                if (
                    item.get("status") == "submitted"
                    and self._matches(item)
                    and fnmatch.fnmatchcase(student_id, self._student_pattern())
                ):
                    infos.append(self._submission_info(course_id, student_id, item))
        return infos

    def _inbound_submissions(self):
        infos = []
        pattern = self._student_pattern()
        for course_id in self.user_courses():
            if self.coursedir.assignment_id and not any(char in self.coursedir.assignment_id for char in "*?["):
                assignment_ids = [self.coursedir.assignment_id]
            else:
                assignment_ids = sorted(
                    {
                        item["assignment_id"]
                        for item in self.service_items(course_id)
                        if item.get("status") == "released" and self._matches(item)
                    }
                )
            for assignment_id in assignment_ids:
                params = {"course_id": course_id, "assignment_id": assignment_id}
                if not any(char in pattern for char in "*?["):
                    params["user_id"] = pattern
                answer = self.api_request(
                    "GET", "collections", f"Listing the submissions of {course_id} {assignment_id}", params
                )
                for item in self.without_rejected(answer.get("value", [])):
                    if fnmatch.fnmatchcase(item["student_id"], pattern):
                        infos.append(self._submission_info(course_id, item["student_id"], item))
        return infos

    def _submission_info(self, course_id, student_id, item):
        """One submission with nbgrader's feedback fields: local from disk, on the exchange from the service."""
        assignment_id, timestamp = item["assignment_id"], item["timestamp"]
        assignment_dir = os.path.join(self.assignment_dir, self.assignment_root(course_id, assignment_id))
        cached = os.path.join(self.cache, course_id, f"{student_id}+{assignment_id}+{timestamp}")
        path = cached if os.path.isdir(cached) else item.get("path") or ""
        feedback_dir = os.path.join(assignment_dir, "feedback", timestamp)
        notebooks = []
        for nb in item.get("notebooks", []):
            local_feedback_path = os.path.join(feedback_dir, "{}.html".format(nb["notebook_id"]))
            has_local = os.path.isfile(local_feedback_path)
            has_exchange = bool(nb.get("has_exchange_feedback"))
            notebooks.append(
                {
                    "notebook_id": nb["notebook_id"],
                    "path": os.path.abspath(os.path.join(path, "{}.ipynb".format(nb["notebook_id"]))),
                    "has_local_feedback": has_local,
                    "has_exchange_feedback": has_exchange,
                    "local_feedback_path": local_feedback_path if has_local else None,
                    # Only feedback already fetched can have been updated since.
                    "feedback_updated": has_local and has_exchange and bool(nb.get("feedback_updated")),
                }
            )
        has_local = bool(notebooks) and all(nb["has_local_feedback"] for nb in notebooks)
        info = {
            "course_id": course_id,
            "student_id": student_id,
            "assignment_id": assignment_id,
            "timestamp": timestamp,
            "status": "removed" if self.remove else "submitted",
            "path": path,
            "notebooks": notebooks,
            "has_local_feedback": has_local,
            "has_exchange_feedback": bool(notebooks) and all(nb["has_exchange_feedback"] for nb in notebooks),
            "feedback_updated": any(nb["feedback_updated"] for nb in notebooks),
            "local_feedback_path": None,
        }
        if has_local:
            base = os.path.abspath(assignment_dir) if os.path.exists(assignment_dir) else assignment_dir
            info["local_feedback_path"] = os.path.join(base, "feedback", timestamp)
        return info

    # -- what the command says --------------------------------------------------------------

    def format_inbound_assignment(self, info):
        """One submission's line, with its feedback state."""
        msg = "{course_id} {student_id} {assignment_id} {timestamp}".format(**info)
        if info["status"] == "submitted":
            if info["has_local_feedback"] and not info["feedback_updated"]:
                msg += " (feedback already fetched)"
            elif info["has_exchange_feedback"]:
                msg += " (feedback ready to be fetched)"
            else:
                msg += " (no feedback available)"
        return msg

    def format_outbound_assignment(self, info):
        """One released assignment's line, saying whether it is here already."""
        msg = "{course_id} {assignment_id}".format(**info)
        if info["status"] == "fetched":
            msg += " (already downloaded)"
        return msg

    def _log_all(self, heading, assignments):
        self.log.info(heading)
        if self.inbound or self.cached:
            for assignment in assignments:
                for info in assignment["submissions"]:
                    self.log.info(self.format_inbound_assignment(info))
        else:
            for info in assignments:
                self.log.info(self.format_outbound_assignment(info))

    def list_files(self):
        """Log and answer the assignments."""
        assignments = self.parse_assignments()
        self._log_all("Submitted assignments:" if self.inbound or self.cached else "Released assignments:", assignments)
        return assignments

    def remove_files(self):
        """Log and remove the assignments: unrelease released ones, forget cached submissions."""
        if self.inbound:
            self.fail("Removing submissions from the exchange is not supported: the exchange keeps every submission.")
        assignments = self.parse_assignments()
        if self.cached:
            self._log_all("Removing submitted assignments:", assignments)
            for assignment in assignments:
                for info in assignment["submissions"]:
                    if os.path.isdir(info["path"]) and os.path.abspath(info["path"]).startswith(
                        os.path.abspath(self.cache)
                    ):
                        shutil.rmtree(info["path"])
            return assignments
        self._log_all("Removing released assignments:", assignments)
        for info in assignments:
            params = {"course_id": info["course_id"], "assignment_id": info["assignment_id"]}
            self.api_request("DELETE", "assignment", f"Removing {info['course_id']} {info['assignment_id']}", params)
        return assignments


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _grouped(infos):
    """Submissions grouped by (course, student, assignment), oldest first, as nbgrader's list returns them."""
    groups = {}
    for info in infos:
        groups.setdefault((info["course_id"], info["student_id"], info["assignment_id"]), []).append(info)
    return [
        {
            "course_id": course_id,
            "student_id": student_id,
            "assignment_id": assignment_id,
            "status": submissions[0]["status"],
            "submissions": sorted(submissions, key=lambda info: info["timestamp"]),
        }
        for (course_id, student_id, assignment_id), submissions in sorted(groups.items())
    ]
