"""Due dates in the record: carried by a release, changed later, and extended per student."""

from __future__ import annotations

import pytest
import requests
from builders import make_archive
from httpclient import course_events, ok, refused, release

DUE = "2026-01-31T23:59:00.000000+00:00"
LATER = "2026-02-07T23:59:00.000000+00:00"


def post(svc, route: str, who: str, method: str = "POST", **params: str) -> requests.Response:
    return requests.request(
        method, svc.url + route, params={"course_id": "phys101", **params}, headers=svc.headers(who), timeout=30
    )


def event_at(svc, position: int) -> dict:
    (event,) = [e for e in course_events(svc, "ada") if e["position"] == position]
    return event


@pytest.mark.parametrize(
    ("sent", "recorded"),
    [
        ("2026-01-31 23:59:00 UTC", DUE),  # nbgrader's format
        ("2026-01-31T23:59:00Z", DUE),
        ("2026-02-01T00:59:00+01:00", DUE),  # another offset: recorded in UTC
        ("2026-01-31 23:59:00", DUE),  # no offset: UTC, as nbgrader keeps it
    ],
)
def test_a_release_carries_its_due_date(svc, sent, recorded):
    position = ok(release(svc, "ada", "dd-query", duedate=sent), 201)["position"]
    assert event_at(svc, position)["payload"]["due_date"] == recorded


def test_a_release_takes_the_due_date_as_a_form_field_too(svc):
    answer = requests.post(
        svc.url + "assignment",
        params={"course_id": "phys101", "assignment_id": "dd-form"},
        files={"assignment": ("a.tar.gz", make_archive())},
        data={"notebooks": ["nb1"], "duedate": "2026-01-31 23:59:00 UTC"},
        headers=svc.headers("ada"),
        timeout=30,
    )
    assert event_at(svc, ok(answer, 201)["position"])["payload"]["due_date"] == DUE


def test_a_release_without_a_due_date_records_none(svc):
    position = ok(release(svc, "ada", "dd-none"), 201)["position"]
    assert event_at(svc, position)["payload"]["due_date"] is None


@pytest.mark.hostile(
    "deadlines", "a release, due date or extension with a due date that is not a time", "400, nothing appended"
)
@pytest.mark.parametrize("bad", ["tomorrow", "2026-13-45 25:00:00", "1706745540"])
def test_a_due_date_that_is_not_a_time_is_refused(svc, bad):
    before = len(course_events(svc, "ada"))
    refused(release(svc, "ada", "dd-bad", duedate=bad), 400, "duedate")
    ok(release(svc, "ada", "dd-bad-set"), 201)
    refused(post(svc, "due_date", "ada", assignment_id="dd-bad-set", duedate=bad), 400, "duedate")
    refused(post(svc, "extension", "ada", assignment_id="dd-bad-set", student_id="s1", duedate=bad), 400, "duedate")
    assert len(course_events(svc, "ada")) == before + 1  # the good release only


def test_an_instructor_changes_and_removes_the_due_date(svc):
    ok(release(svc, "ada", "dd-change", duedate=DUE), 201)
    position = ok(post(svc, "due_date", "ada", assignment_id="dd-change", duedate=LATER), 201)["position"]
    event = event_at(svc, position)
    assert event["type"] == "due_date_set" and event["stream"] == "assignment/1/phys101/dd-change"
    assert event["payload"]["due_date"] == LATER and event["actor"]["name"] == "ada"
    position = ok(post(svc, "due_date", "ada", "DELETE", assignment_id="dd-change"))["position"]
    assert event_at(svc, position)["payload"]["due_date"] is None


def test_an_instructor_grants_one_student_an_extension(svc):
    ok(release(svc, "ada", "dd-ext", duedate=DUE), 201)
    answer = post(svc, "extension", "ada", assignment_id="dd-ext", student_id="s1", duedate=LATER)
    event = event_at(svc, ok(answer, 201)["position"])
    assert event["type"] == "extension_granted" and event["stream"] == "student/1/phys101/dd-ext/s1"
    assert event["payload"]["student_id"] == "s1" and event["payload"]["due_date"] == LATER


def test_a_repeated_request_with_its_key_appends_once(svc):
    ok(release(svc, "ada", "dd-key"), 201)
    params = {"course_id": "phys101", "assignment_id": "dd-key", "student_id": "s2", "duedate": LATER}
    headers = svc.headers("ada", **{"Idempotency-Key": "x1"})
    first, again = (requests.post(svc.url + "extension", params=params, headers=headers, timeout=30) for _ in "12")
    assert ok(first, 201)["position"] == ok(again, 200)["position"]


CHANGES = [
    ("due_date", "POST", {"duedate": LATER}),
    ("due_date", "DELETE", {}),
    ("extension", "POST", {"student_id": "s1", "duedate": LATER}),
]


@pytest.fixture(scope="module")
def released(svc) -> str:
    ok(release(svc, "ada", "dd-who"), 201)
    return "dd-who"


@pytest.fixture(scope="module")
def withdrawn(svc) -> str:
    ok(release(svc, "ada", "dd-gone"), 201)
    ok(
        requests.delete(
            svc.url + "assignment",
            params={"course_id": "phys101", "assignment_id": "dd-gone"},
            headers=svc.headers("ada"),
            timeout=30,
        )
    )
    return "dd-gone"


@pytest.mark.hostile(
    "deadlines", "a student or an outsider setting a due date or granting an extension", "403, nothing appended"
)
@pytest.mark.parametrize("who", ["s1", "stranger"])
@pytest.mark.parametrize(("route", "method", "extra"), CHANGES)
def test_only_an_instructor_changes_due_dates(svc, released, who, route, method, extra):
    before = len(course_events(svc, "ada"))
    refused(post(svc, route, who, method, assignment_id=released, **extra), 403)
    assert len(course_events(svc, "ada")) == before


@pytest.mark.parametrize(("route", "method", "extra"), CHANGES)
def test_due_dates_of_an_assignment_not_released_are_not_found(svc, withdrawn, route, method, extra):
    refused(post(svc, route, "ada", method, assignment_id="dd-never", **extra), 404, "not released")
    refused(post(svc, route, "ada", method, assignment_id=withdrawn, **extra), 404, "not released")


@pytest.mark.parametrize(("route", "extra"), [("due_date", {}), ("extension", {"student_id": "s1"})])
def test_a_change_without_a_due_date_is_refused(svc, released, route, extra):
    refused(post(svc, route, "ada", assignment_id=released, **extra), 400, "duedate", "required")
