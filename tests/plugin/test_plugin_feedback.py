"""release_feedback and fetch_feedback: feedback lands for the submission it was made from, and for no one else."""

from __future__ import annotations


def cached_lines(student):
    return [line.split("] ", 1)[1] for line in student.nbgrader("list", "--cached").splitlines()]


def test_feedback_is_for_the_submission_it_was_made_from(classroom):
    instructor, student1, student2 = classroom.instructor, classroom.student1, classroom.student2
    instructor.release("ps1")
    for student in (student1, student2):
        student.nbgrader("fetch_assignment", "ps1")
    first = student1.submit("ps1")
    other = student2.submit("ps1")
    instructor.nbgrader("collect", "ps1")
    instructor.write_feedback("student1", "ps1", "<p>feedback for student1</p>")
    instructor.write_feedback("student2", "ps1", "<p>feedback for student2</p>")
    second = student1.submit("ps1")  # after the collect: no feedback is made from it
    log = instructor.nbgrader("release_feedback", "ps1")
    assert f"Releasing feedback for student 'student1' on assignment 'course101/ps1/p1' ({first})" in log
    assert f"Releasing feedback for student 'student2' on assignment 'course101/ps1/p1' ({other})" in log

    assert cached_lines(student1) == [
        "Submitted assignments:",
        f"course101 student1 ps1 {first} (feedback ready to be fetched)",
        f"course101 student1 ps1 {second} (no feedback available)",
    ]

    log = student1.nbgrader("fetch_feedback", "ps1")
    feedback = student1.home / "ps1" / "feedback"
    assert f"Fetched feedback: {feedback / first / 'p1.html'}" in log
    assert f"Could not find feedback for 'course101/ps1/p1' submitted at {second}" in log
    assert [path.name for path in feedback.iterdir()] == [first]
    assert (feedback / first / "p1.html").read_text() == "<p>feedback for student1</p>"
    assert cached_lines(student1) == [
        "Submitted assignments:",
        f"course101 student1 ps1 {first} (feedback already fetched)",
        f"course101 student1 ps1 {second} (no feedback available)",
    ]

    student2.nbgrader("fetch_feedback", "ps1")
    assert [path.name for path in (student2.home / "ps1" / "feedback").iterdir()] == [other]
    assert (student2.home / "ps1" / "feedback" / other / "p1.html").read_text() == "<p>feedback for student2</p>"

    # Feedback changed after it was fetched is ready to be fetched again.
    instructor.write_feedback("student1", "ps1", "<p>better feedback for student1</p>")
    instructor.nbgrader("release_feedback", "ps1", "--student=student1")
    assert cached_lines(student1)[1] == f"course101 student1 ps1 {first} (feedback ready to be fetched)"
    student1.nbgrader("fetch_feedback", "ps1")
    assert (feedback / first / "p1.html").read_text() == "<p>better feedback for student1</p>"
    assert cached_lines(student1)[1] == f"course101 student1 ps1 {first} (feedback already fetched)"


def test_no_feedback_yet_and_feedback_that_cannot_be_tied_to_a_submission(classroom):
    instructor, student = classroom.instructor, classroom.student1
    instructor.release("ps1")
    student.nbgrader("fetch_assignment", "ps1")
    stamp = student.submit("ps1")
    log = student.nbgrader("fetch_feedback", "ps1")
    assert f"Could not find feedback for 'course101/ps1/p1' submitted at {stamp}" in log
    assert not (student.home / "ps1" / "feedback").exists()

    instructor.nbgrader("collect", "ps1")
    instructor.write_feedback("student1", "ps1", "<p>feedback</p>")
    secret = instructor.home / "feedback" / "student1" / "ps1" / "submission_secret.txt"
    secret.unlink()
    log = instructor.nbgrader("release_feedback", "ps1", retcode=1)
    assert "Cannot release feedback for student 'student1'" in log
    assert "Feedback not released for: " in log

    # Feedback made from some other submission (another secret) is refused by the student's side.
    secret.write_text("the secret of another submission")
    instructor.nbgrader("release_feedback", "ps1")
    log = student.nbgrader("fetch_feedback", "ps1")
    assert f"Skipping feedback that does not match your submission: 'course101/ps1/p1' submitted at {stamp}" in log
    assert not (student.home / "ps1" / "feedback").exists()
