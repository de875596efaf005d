"""release_assignment and fetch_assignment through the plugin, as nbgrader's own exchange behaves."""

from __future__ import annotations

import os


def test_a_second_release_needs_force_and_big_archives_show_progress(classroom):
    instructor, student = classroom.instructor, classroom.student1
    instructor.create_assignment("ps1", files={"data/numbers.csv": "1,2,3\n"})
    big = os.urandom(5 * 1024 * 1024)  # incompressible: the archive stays over the progress threshold
    (instructor.home / "release" / "ps1" / "data" / "big.bin").write_bytes(big)
    log = instructor.nbgrader("release_assignment", "ps1")
    assert "Released as: course101 ps1" in log
    assert "Uploading ps1.tar.gz [##########] 100% (5.0 of 5.0 MB)" in log

    log = instructor.nbgrader("release_assignment", "ps1", retcode=1)
    assert "Destination already exists, add --force to overwrite: course101 ps1" in log

    (instructor.home / "release" / "ps1" / "data" / "numbers.csv").write_text("4,5,6\n")
    log = instructor.nbgrader("release_assignment", "ps1", "--force")
    assert "Overwriting files: course101 ps1" in log
    assert "Released as: course101 ps1" in log

    log = student.nbgrader("fetch_assignment", "ps1")
    assert "Downloading ps1.tar.gz [##########] 100%" in log
    assert (student.home / "ps1" / "data" / "numbers.csv").read_text() == "4,5,6\n"
    assert (student.home / "ps1" / "data" / "big.bin").read_bytes() == big


def test_fetch_refuses_a_second_copy_and_replace_restores_only_missing_files(classroom):
    classroom.instructor.release("ps1", notebooks=("p1", "p2"), files={"data/numbers.csv": "1,2,3\n"})
    student = classroom.student1
    log = student.nbgrader("fetch_assignment", "ps1")
    assert "Fetched as: course101 ps1" in log
    folder = student.home / "ps1"
    assert sorted(path.name for path in folder.iterdir()) == ["data", "p1.ipynb", "p2.ipynb"]

    log = student.nbgrader("fetch_assignment", "ps1", retcode=1)
    assert "You already have a copy of the assignment in this directory: ps1" in log

    (folder / "p1.ipynb").write_text("my work")
    (folder / "p2.ipynb").unlink()
    (folder / "data" / "numbers.csv").unlink()
    log = student.nbgrader("fetch_assignment", "ps1", "--replace")
    assert "Replacing missing file 'ps1/p2.ipynb'" in log
    assert "Replacing missing file 'ps1/data/numbers.csv'" in log
    assert "p1.ipynb" not in log
    assert (folder / "p1.ipynb").read_text() == "my work"
    assert (folder / "data" / "numbers.csv").read_text() == "1,2,3\n"


def test_refusals_fail_with_the_reason(classroom):
    instructor, student1, student2 = classroom.instructor, classroom.student1, classroom.student2
    log = instructor.nbgrader("release_assignment", "ps9", retcode=1)
    assert "Assignment not found at: " in log
    (instructor.home / "source" / "ps2").mkdir(parents=True)
    log = instructor.nbgrader("release_assignment", "ps2", retcode=1)
    assert "run `nbgrader generate_assignment` first" in log

    student1.create_assignment("ps1")
    log = student1.nbgrader("release_assignment", "ps1", retcode=1)
    assert "Releasing course101 ps1 failed: " in log
    assert "(HTTP 403)" in log

    log = student1.nbgrader("fetch_assignment", "nope", retcode=1)
    assert "Fetching course101 nope failed: " in log
    assert "(HTTP 404)" in log
    assert not (student1.home / "nope").exists()

    instructor.configure("c.CourseDirectory.course_id = 'course102'")
    instructor.release("ps1")
    log = student2.nbgrader("fetch_assignment", "ps1", "--course", "course102", retcode=1)
    assert "Fetching course102 ps1 failed: " in log
    assert "(HTTP 403)" in log
    assert not (student2.home / "ps1").exists()


def test_a_release_sends_the_gradebook_due_date_into_the_log(classroom):
    """The due date nbgrader's gradebook has for the assignment is recorded with the release."""
    import requests

    instructor = classroom.instructor
    instructor.create_assignment("ps1")
    instructor.create_assignment("ps2")
    instructor.nbgrader("db", "assignment", "add", "ps1", "--duedate=2026-01-31 23:59:00 UTC")
    instructor.nbgrader("release_assignment", "ps1")
    instructor.nbgrader("release_assignment", "ps2")  # no due date in the gradebook
    svc = classroom.service
    events = requests.get(
        svc.url + "events", params={"course_id": "course101"}, headers=svc.headers("instructor"), timeout=30
    ).json()["value"]
    due = {e["payload"]["assignment_id"]: e["payload"]["due_date"] for e in events if e["type"] == "released"}
    assert due == {"ps1": "2026-01-31T23:59:00.000000+00:00", "ps2": None}
