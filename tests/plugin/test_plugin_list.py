"""list through the plugin, and the structures nbgrader's assignment list and formgrader get from it."""

from __future__ import annotations

import json

import pytest
from nbgrader.apps.api import NbGraderAPI
from nbgrader.coursedir import CourseDirectory
from nbgrader.exchange import ExchangeFactory
from nbgrader.server_extensions.assignment_list.handlers import AssignmentList


def lines(log):
    """The log's messages without nbgrader's '[ListApp | INFO] ' prefixes."""
    return [line.split("] ", 1)[1] for line in log.splitlines()]


def test_list_released_and_fetched(classroom):
    classroom.instructor.release("ps1")
    classroom.instructor.release("ps2")
    student = classroom.student1
    assert lines(student.nbgrader("list")) == ["Released assignments:", "course101 ps1", "course101 ps2"]
    student.nbgrader("fetch_assignment", "ps1")
    assert lines(student.nbgrader("list")) == [
        "Released assignments:",
        "course101 ps1 (already downloaded)",
        "course101 ps2",
    ]
    assert lines(student.nbgrader("list", "ps2")) == ["Released assignments:", "course101 ps2"]


def test_list_inbound_and_cached(classroom):
    instructor, student1, student2 = classroom.instructor, classroom.student1, classroom.student2
    instructor.release("ps1")
    assert lines(instructor.nbgrader("list", "--inbound")) == ["Submitted assignments:"]
    for student in (student1, student2):
        student.nbgrader("fetch_assignment", "ps1")
    first = student1.submit("ps1")
    second = student1.submit("ps1")
    other = student2.submit("ps1")

    assert lines(instructor.nbgrader("list", "--inbound", "ps1")) == [
        "Submitted assignments:",
        f"course101 student1 ps1 {first} (no feedback available)",
        f"course101 student1 ps1 {second} (no feedback available)",
        f"course101 student2 ps1 {other} (no feedback available)",
    ]
    assert lines(instructor.nbgrader("list", "--inbound", "--student=student2")) == [
        "Submitted assignments:",
        f"course101 student2 ps1 {other} (no feedback available)",
    ]
    # A student sees only their own submissions, at once after submitting.
    assert lines(student2.nbgrader("list", "--cached")) == [
        "Submitted assignments:",
        f"course101 student2 ps1 {other} (no feedback available)",
    ]
    log = student1.nbgrader("list", "--inbound", "--cached", retcode=1)
    assert "Options --inbound and --cached are incompatible." in log
    log = student1.nbgrader("list", "--inbound", retcode=1)
    assert "(HTTP 403)" in log


def test_list_remove(classroom):
    instructor, student = classroom.instructor, classroom.student1
    instructor.release("ps1")
    instructor.release("ps2")
    student.nbgrader("fetch_assignment", "ps2")
    stamp = student.submit("ps2")

    log = instructor.nbgrader("list", "--remove", "ps1")
    assert lines(log) == ["Removing released assignments:", "course101 ps1"]
    assert lines(student.nbgrader("list")) == ["Released assignments:", "course101 ps2 (already downloaded)"]
    assert "(HTTP 404)" in student.nbgrader("fetch_assignment", "ps1", retcode=1)

    log = student.nbgrader("list", "--cached", "--remove")
    assert lines(log) == ["Removing submitted assignments:", f"course101 student1 ps2 {stamp}"]
    assert not (student.cache / "course101" / f"student1+ps2+{stamp}").exists()

    log = instructor.nbgrader("list", "--inbound", "--remove", retcode=1)
    assert "Removing submissions from the exchange is not supported" in log
    assert lines(instructor.nbgrader("list", "--inbound", "ps2")) == [
        "Submitted assignments:",
        f"course101 student1 ps2 {stamp} (no feedback available)",
    ]


def test_several_courses_and_path_includes_course(classroom):
    instructor, student = classroom.instructor, classroom.student1
    instructor.release("ps1")
    instructor.configure("c.CourseDirectory.course_id = 'course102'")
    instructor.release("ps1", "--force", notebooks=("q1",))
    student.configure("c.CourseDirectory.course_id = ''", "c.Exchange.path_includes_course = True")

    assert lines(student.nbgrader("list")) == ["Released assignments:", "course101 ps1", "course102 ps1"]
    student.nbgrader("fetch_assignment", "ps1", "--course=course101")
    log = student.nbgrader("fetch_assignment", "ps1", "--course=course102")
    assert "Fetched as: course102 ps1" in log
    assert (student.home / "course101" / "ps1" / "p1.ipynb").is_file()
    assert (student.home / "course102" / "ps1" / "q1.ipynb").is_file()
    assert lines(student.nbgrader("list")) == [
        "Released assignments:",
        "course101 ps1 (already downloaded)",
        "course102 ps1 (already downloaded)",
    ]

    stamp = student.submit("ps1", "--course=course102")
    assert lines(student.nbgrader("list", "--cached")) == [
        "Submitted assignments:",
        f"course102 student1 ps1 {stamp} (no feedback available)",
    ]
    instructor.nbgrader("collect", "ps1")
    instructor.write_feedback("student1", "ps1", "<p>q1 feedback</p>", notebook_id="q1")
    instructor.nbgrader("release_feedback", "ps1")
    student.nbgrader("fetch_feedback", "ps1", "--course=course102")
    assert (student.home / "course102" / "ps1" / "feedback" / stamp / "q1.html").is_file()
    assert not (student.home / "course101" / "ps1" / "feedback").exists()


# nbgrader's formgrader passes the authenticator to ReleaseFeedback as 'authentictor'.
@pytest.mark.filterwarnings("ignore:Passing unrecognized arguments to super")
def test_the_assignment_list_and_formgrader_get_nbgraders_structures(classroom):
    instructor, student = classroom.instructor, classroom.student1
    instructor.release("ps1")
    instructor.release("ps2")
    student.nbgrader("fetch_assignment", "ps1")
    stamp = student.submit("ps1")
    instructor.nbgrader("collect", "ps1")
    instructor.write_feedback("student1", "ps1", "<p>feedback</p>")
    instructor.nbgrader("release_feedback", "ps1")

    # JupyterLab's assignment list, as nbgrader's server extension runs it.
    manager = AssignmentList()
    manager.root_dir = str(student.home)
    student.take_turn()
    with student.inside():
        answer = manager.list_assignments(course_id="course101")
    assert answer["success"], answer
    json.dumps(answer)
    fetched, released, submitted = answer["value"]
    assert (released["status"], released["assignment_id"]) == ("released", "ps2")
    assert (fetched["status"], fetched["path"]) == ("fetched", "ps1")
    assert [nb["path"] for nb in fetched["notebooks"]] == ["ps1/p1.ipynb"]
    assert submitted["status"] == "submitted"
    (submission,) = submitted["submissions"]
    assert submission["timestamp"] == stamp
    assert submission["has_exchange_feedback"] is True
    assert submission["has_local_feedback"] is False
    assert submission["feedback_updated"] is False
    assert submission["local_feedback_path"] is None
    assert submission["notebooks"][0]["notebook_id"] == "p1"

    with student.inside():
        assert manager.fetch_feedback("course101", "ps1")["success"]
        (submission,) = manager.list_assignments(course_id="course101")["value"][-1]["submissions"]
    assert submission["has_local_feedback"] is True
    assert submission["local_feedback_path"] == f"ps1/feedback/{stamp}"

    # Built the way the server extension first builds it: no course directory, no authenticator.
    config = student.config()
    lister = ExchangeFactory(config=config).List(config=config)
    assert lister.assignment_dir == "."
    with student.inside():
        assert {info["assignment_id"] for info in lister.start()} == {"ps1", "ps2"}

    # The formgrader's API, and its release_feedback, which passes the authenticator misspelt.
    config = instructor.config()
    instructor.take_turn()
    with instructor.inside():
        api = NbGraderAPI(CourseDirectory(config=config), authenticator=None, config=config)
        assert api.exchange_is_functional
        assert api.get_released_assignments() == {"ps1", "ps2"}
        result = api.release_feedback("ps1", "student1")
    assert result["success"], result
    assert "Releasing feedback for student 'student1'" in result["log"]
