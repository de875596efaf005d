"""``report``: the exam board's report over HTTP, for the course's Instructors."""

from __future__ import annotations

import pytest
from httpclient import get, ok, refused, release, submit

DUE = "2026-01-31T23:59:00.000000+00:00"


@pytest.fixture(scope="module")
def assignment(svc) -> dict:
    ok(release(svc, "ada", "rp1", duedate=DUE), 201)
    return ok(submit(svc, "s1", "rp1"), 201)


def test_an_instructor_reads_the_report_made_from_the_log(svc, assignment):
    report = ok(get(svc, "report", "ada", course_id="phys101", assignment_id="rp1"))["value"]
    assert report["due_date"] == DUE and report["log"]["position"] >= assignment["position"]
    assert len(report["log"]["hash"]) == 64
    (row,) = report["students"]
    assert row["student_id"] == "s1" and row["status"] == "late" and row["late_by_seconds"] > 0
    assert row["last_position"] == assignment["position"]
    # A deadline given replaces the log's.
    later = ok(get(svc, "report", "ada", course_id="phys101", assignment_id="rp1", deadline="2099-01-01 00:00:00 UTC"))
    assert later["value"]["students"][0]["status"] == "on time"


@pytest.mark.hostile("report", "a student, an outsider or nobody asking for a course's report", "401 or 403")
@pytest.mark.parametrize(("who", "status"), [("s1", 403), ("stranger", 403), (None, 401)])
def test_only_an_instructor_reads_the_report(svc, assignment, who, status):
    refused(get(svc, "report", who, course_id="phys101", assignment_id="rp1"), status)


@pytest.mark.parametrize(
    ("params", "status", "word"),
    [
        ({"assignment_id": "never"}, 404, "never released"),
        ({"assignment_id": "rp1", "deadline": "soon"}, 400, "deadline"),
        ({"assignment_id": "rp1", "as_of": "yesterday"}, 400, "as_of"),
        ({}, 400, "assignment_id"),
    ],
)
def test_a_report_asked_for_wrongly_is_refused(svc, assignment, params, status, word):
    refused(get(svc, "report", "ada", course_id="phys101", **params), status, word)


def test_a_report_as_of_a_moment_before_the_release_is_not_found(svc, assignment):
    refused(get(svc, "report", "ada", course_id="phys101", assignment_id="rp1", as_of="2000-01-01"), 404, "never")
