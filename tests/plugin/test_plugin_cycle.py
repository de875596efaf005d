"""The whole nbgrader cycle through the plugin, from generate_assignment to fetch_feedback, against a live service."""

from __future__ import annotations

from nbgrader.api import Gradebook


def test_full_cycle(classroom):
    instructor, student1, student2 = classroom.instructor, classroom.student1, classroom.student2
    instructor.create_assignment("ps1", generate=True)
    # Due long ago, so autograde must find both submissions late from the collected timestamp.txt.
    instructor.nbgrader("db", "assignment", "add", "ps1", "--duedate=2020-01-01 00:00:00 UTC")
    log = instructor.nbgrader("release_assignment", "ps1")
    assert "Released as: course101 ps1" in log

    # One student through real nbgrader processes, the other in-process.
    log = student1.nbgrader_process("fetch_assignment", "ps1")
    assert "Fetched as: course101 ps1" in log
    work = student1.home / "ps1" / "p1.ipynb"
    work.write_text(work.read_text().replace("raise NotImplementedError()", "return 42"))
    log = student1.nbgrader_process("submit", "ps1")
    assert "Submitted as: course101 ps1 " in log
    student2.nbgrader("fetch_assignment", "ps1")
    stamp2 = student2.submit("ps1")

    log = instructor.nbgrader("collect", "ps1")
    assert "Processing 2 submissions of 'ps1' for course 'course101'" in log
    assert "Collecting submission: student1 ps1" in log
    assert "Collecting submission: student2 ps1" in log
    assert (instructor.home / "submitted" / "student2" / "ps1" / "timestamp.txt").read_text() == stamp2

    instructor.nbgrader("autograde", "ps1", "--create")
    with Gradebook(f"sqlite:///{instructor.home / 'gradebook.db'}") as gb:
        # student1 answered; student2 handed the released stub back unchanged.
        for student_id, score in (("student1", 1), ("student2", 0)):
            submission = gb.find_submission("ps1", student_id)
            assert submission.total_seconds_late > 0
            assert submission.score == score
    instructor.nbgrader("generate_feedback", "ps1")
    log = instructor.nbgrader("release_feedback", "ps1")
    assert "Releasing feedback for student 'student1' on assignment 'course101/ps1/p1'" in log
    assert "Releasing feedback for student 'student2' on assignment 'course101/ps1/p1'" in log

    log = student1.nbgrader_process("fetch_feedback", "ps1")
    assert "Fetched feedback: " in log
    (stamp1,) = [path.name for path in (student1.home / "ps1" / "feedback").iterdir()]
    html = (student1.home / "ps1" / "feedback" / stamp1 / "p1.html").read_text()
    assert "Score: 1.0 / 1.0" in html
    assert (instructor.home / "submitted" / "student1" / "ps1" / "timestamp.txt").read_text() == stamp1
    log = student2.nbgrader("fetch_feedback", "ps1")
    assert f"Fetched feedback: {student2.home / 'ps1' / 'feedback' / stamp2 / 'p1.html'}" in log
    assert [path.name for path in (student2.home / "ps1" / "feedback").iterdir()] == [stamp2]
    assert "Score: 0.0 / 1.0" in (student2.home / "ps1" / "feedback" / stamp2 / "p1.html").read_text()

    log = student2.nbgrader("list", "--cached")
    assert f"course101 student2 ps1 {stamp2} (feedback already fetched)" in log
