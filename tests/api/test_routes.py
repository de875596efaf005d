"""The whole route table over real HTTP, with every role: instructor, student, stranger, other organisation."""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid

import pytest
import requests
from builders import make_archive, make_symlink_archive
from httpclient import COURSE, get, headers_only, ok, refused, release, submit, until
from service import collect, service_archives

from nbexchange.storage import CHUNK_SIZE


def url(svc, route: str) -> str:
    return svc.url + route


# -- the edges: health, identity, unknown routes, parameters ---------------------


def test_health_ready_metrics_need_no_identity(svc):
    assert ok(get(svc, "health", None))["status"] == "ok"
    ready = ok(get(svc, "ready", None))
    assert ready["database"] == "ok" and ready["broker"] == "ok" and ready["projection_lag"] >= 0
    metrics = get(svc, "metrics", None)
    assert metrics.status_code == 200 and "nbexchange_request_duration_seconds" in metrics.text
    assert "nbexchange_projection_lag_events" in metrics.text


@pytest.mark.parametrize(
    "route", ["assignments", "assignment", "collections", "collection", "feedback", "history", "events"]
)
def test_every_route_refuses_missing_or_wrong_tokens(svc, route):
    refused(requests.get(url(svc, route), params={"course_id": COURSE}, timeout=10), 401, "token")
    bad = {"Authorization": "token not-a-real-token"}
    refused(requests.get(url(svc, route), params={"course_id": COURSE}, headers=bad, timeout=10), 401)


def test_unknown_route_and_method_are_json(svc):
    refused(get(svc, "nothing-here", "ada"), 404, "no such route")
    refused(requests.put(url(svc, "assignments"), headers=svc.headers("ada"), timeout=10), 405, "PUT")


@pytest.mark.hostile(
    "Ids",
    "a course id that is empty, holds '/', is '..', has 256 characters or a control character",
    "400, the note names the rule",
)
@pytest.mark.parametrize(
    "value, words",
    [("", "required"), ("a/b", "'/'"), ("..", ".."), ("x" * 256, "255"), ("bad\x01id", "control")],
)
def test_ids_are_checked(svc, value, words):
    refused(get(svc, "assignments", "s1", course_id=value), 400, words)


def test_malformed_numbers_and_timestamps(svc):
    refused(get(svc, "assignments", "s1", course_id=COURSE, min_position="soon"), 400, "whole number")
    refused(submit(svc, "s1", "ps-x", stamp="yesterday"), 400, "timestamp")
    refused(get(svc, "events", "ada", course_id=COURSE, limit=5000), 400, "limit")


def test_strangers_and_students_are_forbidden_where_due(svc):
    refused(get(svc, "assignments", "stranger", course_id=COURSE), 403, "not a member")
    refused(release(svc, "s1", "ps-forbidden"), 403, "Instructor")
    refused(release(svc, "stranger", "ps-forbidden"), 403, "not a member")
    refused(get(svc, "collections", "s1", course_id=COURSE, assignment_id="ps1"), 403, "Instructor")
    refused(get(svc, "collection", "s1", course_id=COURSE, assignment_id="ps1", path="x"), 403, "Instructor")
    refused(get(svc, "events", "s1", course_id=COURSE), 403, "Instructor")
    refused(
        requests.delete(
            url(svc, "assignment"),
            params={"course_id": COURSE, "assignment_id": "ps1"},
            headers=svc.headers("s1"),
            timeout=10,
        ),
        403,
        "Instructor",
    )
    refused(get(svc, "assignment", "stranger", course_id=COURSE, assignment_id="ps1"), 403)


# -- uploads ---------------------------------------------------------------------


def test_uploads_must_be_multipart_gzip_with_a_file(svc):
    plain = requests.post(
        url(svc, "assignment"),
        params={"course_id": COURSE, "assignment_id": "ps-u"},
        data=b"raw bytes",
        headers=svc.headers("ada"),
        timeout=10,
    )
    refused(plain, 415, "multipart")
    refused(release(svc, "ada", "ps-u", archive=b"<html>not a tarball</html>"), 415, "gzip")
    empty = requests.post(
        url(svc, "assignment"),
        params={"course_id": COURSE, "assignment_id": "ps-u"},
        files={"notebooks": (None, "a")},
        headers=svc.headers("ada"),
        timeout=10,
    )
    refused(empty, 400, "no file")
    refused(release(svc, "ada", "ps-u", notebooks=["../../etc"]), 400, "notebooks")


def test_oversized_upload_is_refused_before_its_body_is_read(svc):
    """Send only the headers of a 100 GB upload: the 413 arrives without a byte of body."""
    query = f"submission?course_id={COURSE}&assignment_id=ps1&timestamp=2026-01-01%2000:00:00%20UTC"
    reply = headers_only(svc, "s1", query, 100 * 1024**3)
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"success": false' in reply and "at most" in reply


# -- the cycle -------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [0, 1, 2.5], ids=["tiny", "about one chunk", "several chunks"])
def test_a_download_is_the_stored_archive_whatever_its_size_in_chunks(svc, chunks):
    # Incompressible notebooks, so the stored archive is about ``chunks`` read chunks (1 MiB) long: the
    # reads stop at Content-Length, and a chunk's end is never taken for the archive's.
    assignment = f"big{str(chunks).replace('.', '_')}"
    archive = make_archive({"nb1.ipynb": os.urandom(int(chunks * CHUNK_SIZE))})
    ok(release(svc, "ada", assignment, archive), 201)
    fetched = get(svc, "assignment", "s1", course_id=COURSE, assignment_id=assignment)
    assert fetched.status_code == 200 and fetched.content == archive
    assert int(fetched.headers["Content-Length"]) == len(archive)

    submitted = ok(submit(svc, "s1", assignment, archive), 201)
    listed = ok(
        get(svc, "collections", "ada", course_id=COURSE, assignment_id=assignment, min_position=submitted["position"])
    )["value"]
    collected = get(svc, "collection", "ada", course_id=COURSE, assignment_id=assignment, path=listed[0]["path"])
    assert collected.status_code == 200 and collected.content == archive
    assert int(collected.headers["Content-Length"]) == len(archive)


def test_release_fetch_submit_collect_feedback(svc):
    archive = make_archive({"nb1.ipynb": b"{}", "nb2.ipynb": b"{}"})
    body = ok(release(svc, "ada", "ps1", archive, notebooks=("nb1", "nb2")), 201)
    assert body["note"] == "Released" and body["position"] >= 1

    listing = ok(get(svc, "assignments", "s1", course_id=COURSE, min_position=body["position"]))
    released = [i for i in listing["value"] if i["assignment_id"] == "ps1" and i["status"] == "released"]
    assert released and [n["notebook_id"] for n in released[0]["notebooks"]] == ["nb1", "nb2"]
    assert listing["position"] >= body["position"]

    fetched = get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps1")
    assert fetched.status_code == 200 and fetched.content == archive
    assert fetched.headers["Content-Type"] == "application/gzip"
    refused(get(svc, "assignment", "s1", course_id=COURSE, assignment_id="never-released"), 404, "not released")

    first = ok(submit(svc, "s1", "ps1", stamp="2026-01-31 10:00:00.000001 UTC"), 201)
    second = ok(submit(svc, "s1", "ps1", stamp="2026-01-31 11:00:00.000002 UTC"), 201)
    third = ok(submit(svc, "s2", "ps1"), 201)
    assert first["note"] == "Submitted" and second["position"] > first["position"]

    mine = ok(get(svc, "assignments", "s1", course_id=COURSE, min_position=second["position"]))["value"]
    statuses = [(i["status"], i["timestamp"]) for i in mine if i["assignment_id"] == "ps1"]
    assert ("fetched", statuses[1][1]) in statuses
    assert ("submitted", "2026-01-31 11:00:00.000002 UTC") in statuses
    assert all(i["student_id"] == "s1" for i in mine if i["status"] != "released")

    subs = ok(get(svc, "collections", "ada", course_id=COURSE, assignment_id="ps1", min_position=third["position"]))
    by_student = {}
    for item in subs["value"]:
        by_student.setdefault(item["student_id"], []).append(item)
    assert len(by_student["s1"]) == 2 and len(by_student["s2"]) == 1
    latest = by_student["s1"][-1]
    assert latest["latest"] and latest["full_name"] == "S1" and latest["email"] == "s1@example.org"
    assert latest["lms_user_id"] == "lms-s1" and latest["status"] == "submitted"
    only_s2 = ok(get(svc, "collections", "ada", course_id=COURSE, assignment_id="ps1", user_id="s2"))["value"]
    assert [i["student_id"] for i in only_s2] == ["s2"]

    collected = get(svc, "collection", "ada", course_id=COURSE, assignment_id="ps1", path=latest["path"])
    assert collected.status_code == 200 and collected.content == make_archive({"nb1.ipynb": b"s1"})
    refused(get(svc, "collection", "ada", course_id=COURSE, assignment_id="ps1", path="f" * 64), 404, "no submission")
    lookalikes = ("0x" + latest["path"][2:], latest["path"].upper(), latest["path"][:15], "0 " + latest["path"][2:])
    for wrong in ("g" * 64, *lookalikes):  # not a number: must not reach int(..., 16)
        refused(get(svc, "collection", "ada", course_id=COURSE, assignment_id="ps1", path=wrong), 404, "no submission")
    # Leading whitespace is refused by the id rule before any lookup.
    spaced = "  " + latest["path"][2:]
    refused(get(svc, "collection", "ada", course_id=COURSE, assignment_id="ps1", path=spaced), 400, "whitespace")

    def feedback(who, student, stamp, html=b"<html>well done</html>"):
        return requests.post(
            url(svc, "feedback"),
            params={
                "course_id": COURSE,
                "assignment_id": "ps1",
                "notebook": "nb1",
                "student": student,
                "timestamp": stamp,
                "checksum": "abc123",
            },
            files={"feedback": ("nb1.html", html)},
            headers=svc.headers(who),
            timeout=10,
        )

    refused(feedback("s1", "s1", latest["timestamp"]), 403, "Instructor")
    refused(feedback("ada", "s1", "2020-01-01 00:00:00.000000 UTC"), 404, "no submission")
    given = ok(feedback("ada", "s1", latest["timestamp"]), 201)

    fb = ok(get(svc, "feedback", "s1", course_id=COURSE, assignment_id="ps1", min_position=given["position"]))
    assert [(f["filename"], f["timestamp"], f["checksum"]) for f in fb["feedback"]] == [
        ("nb1.html", latest["timestamp"], "abc123")
    ]
    assert base64.b64decode(fb["feedback"][0]["content"]) == b"<html>well done</html>"
    assert ok(get(svc, "feedback", "s2", course_id=COURSE, assignment_id="ps1"))["feedback"] == []
    # Instructors see which submissions have feedback, per notebook (nbgrader's `list --inbound`).
    inbound = ok(get(svc, "collections", "ada", course_id=COURSE, assignment_id="ps1", min_position=fb["position"]))
    marked = {(i["student_id"], i["timestamp"]): i["notebooks"] for i in inbound["value"]}
    assert marked[("s1", latest["timestamp"])][0]["has_exchange_feedback"] is True
    assert not any(n["has_exchange_feedback"] for n in marked[("s1", by_student["s1"][0]["timestamp"])])

    mine = ok(get(svc, "assignments", "s1", course_id=COURSE, min_position=fb["position"]))["value"]
    graded = [i for i in mine if i["status"] == "submitted" and i["timestamp"] == latest["timestamp"]][0]
    nb1 = [n for n in graded["notebooks"] if n["notebook_id"] == "nb1"][0]
    # Feedback is filed under the submission it is on: its timestamp, not the time it was released.
    assert nb1["has_exchange_feedback"] is True and nb1["feedback_timestamp"] == latest["timestamp"]
    earlier = [i for i in mine if i["status"] == "submitted" and i["timestamp"] != latest["timestamp"]][0]
    assert not any(n["has_exchange_feedback"] for n in earlier["notebooks"])
    assert "feedback_fetched" in [i["status"] for i in mine]


def test_unsafe_archive_is_accepted_then_rejected_by_a_worker(svc):
    ok(release(svc, "ada", "ps-unsafe"), 201)
    until(lambda: get(svc, "assignment", "s2", course_id=COURSE, assignment_id="ps-unsafe").status_code == 200)
    accepted = ok(submit(svc, "s2", "ps-unsafe", archive=make_symlink_archive()), 201)

    def rejected():
        items = ok(
            get(
                svc,
                "collections",
                "ada",
                course_id=COURSE,
                assignment_id="ps-unsafe",
                min_position=accepted["position"],
            )
        )["value"]
        return items and items[0]["archive"]["state"] == "rejected" and items[0]

    item = until(rejected)
    assert "link" in item["archive"]["reason"]
    refused(get(svc, "collection", "ada", course_id=COURSE, assignment_id="ps-unsafe", path=item["path"]), 422, "link")
    mine = ok(get(svc, "assignments", "s2", course_id=COURSE))["value"]
    theirs = [i for i in mine if i["assignment_id"] == "ps-unsafe" and i["status"] == "submitted"]
    assert theirs[0]["archive"]["state"] == "rejected"


def test_idempotency_key_returns_the_first_answer(svc):
    ok(release(svc, "ada", "ps-idem"), 201)
    until(lambda: get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps-idem").status_code == 200)
    key = str(uuid.uuid4())
    first = ok(submit(svc, "s1", "ps-idem", key=key), 201)
    again = ok(submit(svc, "s1", "ps-idem", key=key), 200)
    assert again["position"] == first["position"] and again["note"] == "Submitted"
    items = ok(
        get(svc, "collections", "ada", course_id=COURSE, assignment_id="ps-idem", min_position=first["position"])
    )["value"]
    assert len(items) == 1
    refused(release(svc, "s1", "ps-idem", key=key), 403)
    # The same key on another kind of request is a mistake worth telling apart.
    other = requests.get(
        url(svc, "assignment"),
        params={"course_id": COURSE, "assignment_id": "ps-idem"},
        headers={**svc.headers("s1"), "Idempotency-Key": key},
        timeout=10,
    )
    refused(other, 422, "Idempotency-Key")
    # Keys are per user: another student's identical key is their own.
    ok(submit(svc, "s2", "ps-idem", key=key), 201)


def test_unrelease_and_purge(svc):
    # Bytes of its own: an archive another live release uses is (rightly) never purged.
    ok(release(svc, "ada", "ps-gone", archive=make_archive({"nb1.ipynb": b"only here"})), 201)
    until(lambda: get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps-gone").status_code == 200)
    gone = requests.delete(
        url(svc, "assignment"),
        params={"course_id": COURSE, "assignment_id": "ps-gone", "purge": "true"},
        headers=svc.headers("ada"),
        timeout=10,
    )
    body = ok(gone)
    assert body["note"] == "Unreleased and purged"
    listing = ok(get(svc, "assignments", "s1", course_id=COURSE, min_position=body["position"]))["value"]
    assert "ps-gone" not in {i["assignment_id"] for i in listing}
    refused(get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps-gone"), 404, "not released")
    again = requests.delete(
        url(svc, "assignment"),
        params={"course_id": COURSE, "assignment_id": "ps-gone"},
        headers=svc.headers("ada"),
        timeout=10,
    )
    refused(again, 404, "not released")
    events = ok(get(svc, "events", "ada", course_id=COURSE, assignment_id="ps-gone"))["value"]
    assert "unreleased" in [e["type"] for e in events], [e["type"] for e in events]
    unreleased = [e for e in events if e["type"] == "unreleased"][0]
    purged = unreleased["payload"]["purged_archives"]
    # The purge makes the archive collectable; the collector removes it (here at once: no grace).
    assert purged and service_archives(svc).exists(purged[0])
    assert purged[0] in collect(svc)["blobs"]
    assert not service_archives(svc).exists(purged[0])


def test_other_organisation_sees_nothing(svc):
    ok(release(svc, "ada", "ps-org"), 201)
    theirs = ok(get(svc, "assignments", "other_org_ada", course_id=COURSE))["value"]
    assert "ps-org" not in {i["assignment_id"] for i in theirs}
    assert ok(get(svc, "collections", "other_org_ada", course_id=COURSE, assignment_id="ps1"))["value"] == []
    assert ok(get(svc, "events", "other_org_ada", course_id=COURSE))["value"] == []
    refused(get(svc, "assignment", "other_org_ada", course_id=COURSE, assignment_id="ps-org"), 404)


def test_history_and_events(svc):
    ok(release(svc, "ada", "ps-h"), 201)
    until(lambda: get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps-h").status_code == 200)
    sub = ok(submit(svc, "s1", "ps-h"), 201)
    mine = ok(get(svc, "history", "s2", course_id=COURSE, min_position=sub["position"]))["value"]
    actions = [a for c in mine for a in c["assignments"] if a["assignment_id"] == "ps-h"][0]["actions"]
    assert [a["action"] for a in actions] == ["released"]  # s1's submission is not s2's business
    everything = ok(get(svc, "history", "ada", course_id=COURSE, min_position=sub["position"]))["value"]
    actions = [a for c in everything for a in c["assignments"] if a["assignment_id"] == "ps-h"][0]["actions"]
    assert {"released", "fetched", "submitted"} <= {a["action"] for a in actions}
    only = ok(get(svc, "history", "ada", course_id=COURSE, action="submitted"))["value"]
    assert {a["action"] for c in only for x in c["assignments"] for a in x["actions"]} == {"submitted"}
    refused(get(svc, "history", "ada", action="exploded"), 400, "unknown action")

    page = ok(get(svc, "events", "ada", course_id=COURSE, limit=2))
    assert len(page["value"]) == 2 and page["next_after"] == page["value"][-1]["position"]
    for event in page["value"]:
        assert len(event["hash"]) == 64 and len(event["prev_hash"]) == 64 and event["recorded_at"]
    rest = ok(get(svc, "events", "ada", course_id=COURSE, after=page["next_after"], limit=1000))["value"]
    assert rest and rest[0]["position"] > page["next_after"]


@pytest.mark.hostile(
    "Numbers and timestamps",
    "min_position past the log's last position",
    "400 at once, naming the log's last position (a position the log has but the read models lack yet: a wait "
    "of up to consistency_timeout, then 503 with Retry-After)",
)
def test_min_position_past_the_log_is_refused_at_once(svc):
    head = ok(get(svc, "assignments", "ada", course_id=COURSE))["position"]
    # A position the log does not have is the client's error, answered at once.
    started = time.monotonic()
    refused(get(svc, "assignments", "ada", course_id=COURSE, min_position=head + 10_000), 400, "past the log's last")
    assert time.monotonic() - started < 1.5
    # Writes (a fetch appends) decide on the log itself, never waiting for the read models.
    ok(release(svc, "ada", "ps-wait"), 201)
    fetched = get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps-wait", min_position=head + 10_000)
    assert fetched.status_code == 200, fetched.text


def test_purge_keeps_bytes_a_submission_shares(svc):
    """A student who submits the released archive unchanged keeps their submission after a purge."""
    same = make_archive({"nb1.ipynb": b"untouched starter"})
    ok(release(svc, "ada", "ps-shared", archive=same), 201)
    until(lambda: get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps-shared").status_code == 200)
    sub = ok(submit(svc, "s1", "ps-shared", archive=same), 201)
    items = ok(
        get(svc, "collections", "ada", course_id=COURSE, assignment_id="ps-shared", min_position=sub["position"])
    )["value"]
    gone = requests.delete(
        url(svc, "assignment"),
        params={"course_id": COURSE, "assignment_id": "ps-shared", "purge": "true"},
        headers=svc.headers("ada"),
        timeout=10,
    )
    ok(gone)
    events = ok(get(svc, "events", "ada", course_id=COURSE, assignment_id="ps-shared"))["value"]
    # The purge disowns the release's archive; the submission still owns the same bytes.
    sha = hashlib.sha256(same).hexdigest()
    assert [e["payload"]["purged_archives"] for e in events if e["type"] == "unreleased"] == [[sha]]
    assert sha not in collect(svc)["blobs"]
    collected = get(svc, "collection", "ada", course_id=COURSE, assignment_id="ps-shared", path=items[0]["path"])
    assert collected.status_code == 200 and collected.content == same


def test_retried_release_and_unrelease_get_their_first_answer(svc):
    """A retry must not conflict with its own first attempt, nor 404 on what it withdrew."""
    key = str(uuid.uuid4())
    first = ok(release(svc, "ada", "ps-retry", key=key), 201)
    ok(release(svc, "ada", "ps-retry"), 201)  # someone else moves the stream on
    again = ok(release(svc, "ada", "ps-retry", key=key), 200)
    assert again["position"] == first["position"]

    def withdraw(key, after=0):
        return requests.delete(
            url(svc, "assignment"),
            params={"course_id": COURSE, "assignment_id": "ps-retry", "min_position": after},
            headers={**svc.headers("ada"), "Idempotency-Key": key},
            timeout=10,
        )

    until(lambda: get(svc, "assignment", "ada", course_id=COURSE, assignment_id="ps-retry").status_code == 200)
    gone_key = str(uuid.uuid4())
    gone = ok(withdraw(gone_key))
    assert ok(withdraw(gone_key))["position"] == gone["position"]
    refused(withdraw(str(uuid.uuid4()), after=gone["position"]), 404, "not released")


@pytest.mark.parametrize("route", ["assignments", "collections", "history", "events"])
def test_refusals_on_list_routes_carry_an_empty_value(svc, route):
    """Clients of the earlier service index ``value`` in any answer of a list route."""
    params = {"course_id": COURSE, "assignment_id": "ps1"}
    answers = [
        requests.get(url(svc, route), params=params, timeout=10),  # 401
        get(svc, route, "stranger", **params),  # 403
        get(svc, route, "ada", **{**params, "course_id": "a/b"}),  # 400
        # 503 once a read's wait for its position gives up; events take no position: 400.
        get(svc, route, "ada", **params, **({"after": "-1"} if route == "events" else {"min_position": 10**12})),
    ]
    for answer in answers:
        assert answer.status_code >= 400, answer.text
        assert refused(answer, answer.status_code)["value"] == []
    # Other routes' refusals have no value to index.
    assert "value" not in refused(get(svc, "assignment", "stranger", **params), 403)
