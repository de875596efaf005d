"""Ids compare exactly: courses, assignments and students whose ids differ only in case never see each other.

Every list and read route is tried, as every user, on a service whose courses
(``PHYS101``/``phys101``), assignments (``PS1``/``ps1``) and students
(``Sam``/``sam``) differ only in case; on whichever backend the suite runs on
(SQLite, whose ``LIKE`` ignores ASCII case, or PostgreSQL).
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from builders import make_archive
from httpclient import course_events, get, ok, refused, release, submit
from service import TEST_BROKER_URL, Service, drop_db, fresh_db_url, start_service

COURSES = ("PHYS101", "phys101")
ASSIGNMENTS = ("PS1", "ps1")
STUDENTS = ("Sam", "sam")
INSTRUCTORS = {"PHYS101": "Ada", "phys101": "ada"}
USERS = {
    "Ada": {"PHYS101": "Instructor"},
    "ada": {"phys101": "Instructor"},
    "Sam": {course: "Student" for course in COURSES},
    "sam": {course: "Student" for course in COURSES},
}
SLOTS = list(itertools.product(COURSES, ASSIGNMENTS))

pytestmark = pytest.mark.hostile(
    "Exact ids",
    "every list and read route (assignments, assignment, collections, collection, feedback, history, events with "
    "and without assignment_id), as users of courses, assignments and students whose ids differ only in case "
    "(PHYS101/phys101, PS1/ps1, Sam/sam)",
    "each sees only its own: ids compare byte for byte on SQLite and PostgreSQL",
)


def released(course: str, assignment: str) -> bytes:
    return make_archive({"nb1.ipynb": f"release {course}/{assignment}".encode()})


def submitted(course: str, assignment: str, student: str) -> bytes:
    return make_archive({"nb1.ipynb": f"work {course}/{assignment}/{student}".encode()})


def feedback_html(course: str, assignment: str, student: str) -> bytes:
    return f"<html>feedback {course}/{assignment}/{student}</html>".encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, int]]:
    """A service where everything exists twice, in ids that differ only in case; and the last write's position."""
    root = tmp_path_factory.mktemp("exact-ids")
    url, token = fresh_db_url(root)
    svc = start_service(root, USERS, db_url=url, broker_url=TEST_BROKER_URL)
    try:
        last = 0
        for course, assignment in SLOTS:
            archive = released(course, assignment)
            last = ok(release(svc, INSTRUCTORS[course], assignment, archive, course=course), 201)["position"]
        for (course, assignment), student in itertools.product(SLOTS, STUDENTS):
            fetched = get(svc, "assignment", student, course_id=course, assignment_id=assignment, min_position=last)
            assert fetched.status_code == 200 and fetched.content == released(course, assignment), fetched.text
            stamp = "2026-01-31 10:00:00.000001 UTC"
            work = submitted(course, assignment, student)
            done = ok(submit(svc, student, assignment, work, stamp=stamp, course=course), 201)
            given = requests.post(
                svc.url + "feedback",
                params={
                    "course_id": course,
                    "assignment_id": assignment,
                    "notebook": "nb1",
                    "student": student,
                    "timestamp": stamp,
                    "checksum": f"{course}-{assignment}-{student}",
                    "min_position": done["position"],
                },
                files={"feedback": ("nb1.html", feedback_html(course, assignment, student))},
                headers=svc.headers(INSTRUCTORS[course]),
                timeout=30,
            )
            last = ok(given, 201)["position"]
        yield svc, last
    finally:
        svc.stop()
        drop_db(token)


def read(svc: Service, route: str, who: str, at: int, **params: Any) -> dict[str, Any]:
    return ok(get(svc, route, who, min_position=at, **params))


@pytest.mark.parametrize("course", COURSES)
@pytest.mark.parametrize("student", STUDENTS)
def test_assignments_list_only_that_course_and_student(world, course, student):
    svc, at = world
    items = read(svc, "assignments", student, at, course_id=course)["value"]
    assert {i["course_id"] for i in items} == {course}
    assert {i["student_id"] for i in items} == {student}
    assert {i["assignment_id"] for i in items} == set(ASSIGNMENTS)
    assert {i["status"] for i in items} >= {"released", "fetched", "submitted"}
    # Each assignment is listed once as released, with its own archive.
    assert sorted(i["assignment_id"] for i in items if i["status"] == "released") == sorted(ASSIGNMENTS)


@pytest.mark.parametrize("course, assignment", SLOTS)
@pytest.mark.parametrize("student", STUDENTS)
def test_fetch_and_feedback_are_that_course_assignment_and_student(world, course, assignment, student):
    svc, at = world
    fetched = get(svc, "assignment", student, course_id=course, assignment_id=assignment)
    assert fetched.status_code == 200 and fetched.content == released(course, assignment)
    files = read(svc, "feedback", student, at, course_id=course, assignment_id=assignment)["feedback"]
    assert [(base64.b64decode(f["content"]), f["checksum"]) for f in files] == [
        (feedback_html(course, assignment, student), f"{course}-{assignment}-{student}")
    ]


@pytest.mark.parametrize("course, assignment", SLOTS)
def test_collections_and_collection_are_that_course_and_assignment(world, course, assignment):
    svc, at = world
    teacher = INSTRUCTORS[course]
    items = read(svc, "collections", teacher, at, course_id=course, assignment_id=assignment)["value"]
    assert sorted((i["course_id"], i["assignment_id"], i["student_id"]) for i in items) == sorted(
        (course, assignment, s) for s in STUDENTS
    )
    for student in STUDENTS:
        (mine,) = read(svc, "collections", teacher, at, course_id=course, assignment_id=assignment, user_id=student)[
            "value"
        ]
        assert mine["student_id"] == student
        got = get(svc, "collection", teacher, course_id=course, assignment_id=assignment, path=mine["path"])
        assert got.status_code == 200 and got.content == submitted(course, assignment, student)
        # The same path under the look-alike assignment names no submission there.
        other = ASSIGNMENTS[1 - ASSIGNMENTS.index(assignment)]
        refused(
            get(svc, "collection", teacher, course_id=course, assignment_id=other, path=mine["path"]),
            404,
            "no submission",
        )


@pytest.mark.parametrize("course", COURSES)
def test_instructors_are_refused_the_look_alike_course(world, course):
    svc, _ = world
    other = COURSES[1 - COURSES.index(course)]
    teacher = INSTRUCTORS[course]
    for route, params in [
        ("assignments", {}),
        ("assignment", {"assignment_id": "ps1"}),
        ("collections", {"assignment_id": "ps1"}),
        ("collection", {"assignment_id": "ps1", "path": "0" * 64}),
        ("feedback", {"assignment_id": "ps1"}),
        ("history", {}),
        ("events", {}),
        ("events", {"assignment_id": "ps1"}),
    ]:
        refused(get(svc, route, teacher, course_id=other, **params), 403, "not a member")


@pytest.mark.parametrize("who", sorted(USERS))
def test_history_shows_only_the_callers_courses_and_own_actions(world, who):
    svc, at = world
    for params in ({}, *({"course_id": c} for c in USERS[who])):
        groups = read(svc, "history", who, at, **params)["value"]
        assert {g["course_id"] for g in groups} == ({params["course_id"]} if params else set(USERS[who]))
        for group in groups:
            assert {a["assignment_id"] for a in group["assignments"]} == set(ASSIGNMENTS)
            students = {act["student_id"] for a in group["assignments"] for act in a["actions"]} - {None, ""}
            assert students == ({who} if USERS[who][group["course_id"]] == "Student" else set(STUDENTS))


@pytest.mark.parametrize("course", COURSES)
@pytest.mark.parametrize("assignment", [None, *ASSIGNMENTS])
def test_events_are_that_course_and_assignment(world, course, assignment):
    svc, at = world
    read(svc, "events", INSTRUCTORS[course], at, course_id=course)  # caught up to the last write
    events = course_events(svc, INSTRUCTORS[course], course, assignment)
    places = {tuple(e["stream"].split("/")[2:4]) for e in events}
    assert places == ({(course, assignment)} if assignment else {(course, a) for a in ASSIGNMENTS})
    kinds = {e["type"] for e in events}
    assert {"released", "fetched", "submitted", "feedback_released"} <= kinds
    students = {e["stream"].split("/")[4] for e in events if e["stream"].startswith("student/")}
    assert students == set(STUDENTS)
