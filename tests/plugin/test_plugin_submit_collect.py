"""submit and collect through the plugin: stamps, strictness, copy rules, and which submission is collected."""

from __future__ import annotations

import io
import tarfile
import time

import requests
from nbgrader.utils import parse_utc


def fetched(classroom, *students, **release):
    """Release ps1 and have each student fetch it; answer the students."""
    classroom.instructor.release("ps1", **release)
    for student in students:
        student.nbgrader("fetch_assignment", "ps1")
    return students


def test_submit_stamps_the_submission_and_caches_a_copy(classroom):
    (student,) = fetched(classroom, classroom.student1)
    stamp = student.submit("ps1")
    assert parse_utc(stamp) is not None
    # At once, with no waiting by the test: min_position makes the service show it.
    log = student.nbgrader("list", "--cached")
    assert f"course101 student1 ps1 {stamp} (no feedback available)" in log

    cached = student.cache / "course101" / f"student1+ps1+{stamp}"
    assert (cached / "timestamp.txt").read_text() == stamp
    secret = (cached / "submission_secret.txt").read_text()
    assert len(secret) == 128 and int(secret, 16) >= 0
    assert (cached / "p1.ipynb").is_file()

    instructor = classroom.instructor
    log = instructor.nbgrader("collect", "ps1")
    assert "Collecting submission: student1 ps1" in log
    collected = instructor.home / "submitted" / "student1" / "ps1"
    assert (collected / "timestamp.txt").read_text() == stamp
    assert (collected / "submission_secret.txt").read_text() == secret
    assert instructor.nbgrader("collect", "ps1").count("Submission already exists, use --update to update") == 1


def test_strict_submit_fails_on_a_missing_notebook(classroom):
    (student,) = fetched(classroom, classroom.student1, notebooks=("p1", "p2"))
    (student.home / "ps1" / "p2.ipynb").unlink()

    log = student.nbgrader("submit", "ps1", "--strict", retcode=1)
    assert "course101 ps1 was NOT submitted. There are missing notebooks for the submission:" in log
    assert "p2.ipynb: MISSING" in log
    assert not (student.cache / "course101").exists()
    log = classroom.instructor.nbgrader("collect", "ps1")
    assert "No submissions of 'ps1' for course 'course101' to collect" in log

    log = student.nbgrader("submit", "ps1")
    assert "Possible missing notebooks and/or extra notebooks submitted for assignment ps1" in log
    assert "Submitted as: course101 ps1 " in log


def test_submit_honours_ignore_include_and_max_file_size(classroom):
    (student,) = fetched(classroom, classroom.student1, files={"data/numbers.csv": "1,2,3\n"})
    folder = student.home / "ps1"
    (folder / "scratch.tmp").write_text("notes")
    (folder / "big.bin").write_bytes(b"x" * 20_000)
    student.configure(
        "c.CourseDirectory.ignore = ['.ipynb_checkpoints', '*.tmp']", "c.CourseDirectory.max_file_size = 10"
    )
    log = student.nbgrader("submit", "ps1")
    assert "Ignoring file too large" in log

    instructor = classroom.instructor
    instructor.nbgrader("collect", "ps1")
    collected = instructor.home / "submitted" / "student1" / "ps1"
    names = sorted(str(path.relative_to(collected)) for path in collected.rglob("*"))
    assert names == ["data", "data/numbers.csv", "p1.ipynb", "submission_secret.txt", "timestamp.txt"]

    student.configure("c.CourseDirectory.include = ['*.ipynb']")
    log = student.nbgrader("submit", "ps1")
    assert "Ignoring file too large" not in log
    instructor.nbgrader("collect", "ps1", "--update")
    names = sorted(str(path.relative_to(collected)) for path in collected.rglob("*"))
    assert names == ["data", "p1.ipynb", "submission_secret.txt", "timestamp.txt"]


def test_collect_takes_the_newest_and_honours_update_student_and_before_duedate(classroom):
    student1, student2 = fetched(classroom, classroom.student1, classroom.student2)
    first = student1.submit("ps1")
    second = student1.submit("ps1")
    other = student2.submit("ps1")
    instructor = classroom.instructor
    stamp_of = {
        student_id: instructor.home / "submitted" / student_id / "ps1" / "timestamp.txt"
        for student_id in ("student1", "student2")
    }

    log = instructor.nbgrader("collect", "ps1", "--student=student1")
    assert "Processing 1 submissions of 'ps1' for course 'course101'" in log
    assert stamp_of["student1"].read_text() == second
    assert not stamp_of["student2"].exists()

    log = instructor.nbgrader("collect", "ps1")
    assert "Submission already exists, use --update to update: student1 ps1" in log
    assert "Collecting submission: student2 ps1" in log
    assert stamp_of["student2"].read_text() == other

    third = student1.submit("ps1")
    log = instructor.nbgrader("collect", "ps1", "--update")
    assert "Updating submission: student1 ps1" in log
    assert "No newer submission to collect: student2 ps1" in log
    assert stamp_of["student1"].read_text() == third

    instructor.nbgrader("db", "assignment", "add", "ps1", f"--duedate={first}")
    log = instructor.nbgrader("collect", "ps1", "--before-duedate")
    assert "Updating submission: student1 ps1" in log
    assert stamp_of["student1"].read_text() == first


def test_a_rejected_submission_is_skipped_with_the_reason(classroom):
    (student,) = fetched(classroom, classroom.student1)
    service = classroom.service
    # An archive the plugin would never make: the service stores it, then its check rejects it.
    crafted = io.BytesIO()
    with tarfile.open(fileobj=crafted, mode="w:gz") as tar:
        link = tarfile.TarInfo("p1.ipynb")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    answer = requests.post(
        service.url + "submission",
        params={"course_id": "course101", "assignment_id": "ps1", "timestamp": "2026-01-01 00:00:00.000000 UTC"},
        headers={"Authorization": f"token {service.tokens['student1']}"},
        files={"assignment": ("ps1.tar.gz", crafted.getvalue(), "application/gzip")},
    )
    assert answer.status_code == 201, answer.text
    wait_for_archive_check(service, "instructor")

    log = classroom.instructor.nbgrader("collect", "ps1")
    skipped = "Skipping course101 ps1 of student1 (2026-01-01 00:00:00.000000 UTC): the exchange rejected its archive: "
    assert skipped in log
    assert "symbolic link" in log
    assert "No submissions of 'ps1' for course 'course101' to collect" in log
    log = student.nbgrader("list", "--cached")
    assert "the exchange rejected its archive" in log
    assert log.splitlines()[-1].endswith("Submitted assignments:")


def wait_for_archive_check(service, user, timeout=15.0):
    """Wait until the service lists the submission of course101's ps1 and has checked its archive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = requests.get(
            service.url + "collections",
            params={"course_id": "course101", "assignment_id": "ps1"},
            headers={"Authorization": f"token {service.tokens[user]}"},
        ).json()
        if answer["value"] and all(item["archive"]["state"] != "pending" for item in answer["value"]):
            return
        time.sleep(0.05)
    raise AssertionError(f"The archives were not checked within {timeout}s: {answer}")
