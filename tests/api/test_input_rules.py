"""Ids, numbers and timestamps from clients: one rule each, on every route, and 400 (never 500) for the rest."""

from __future__ import annotations

import unicodedata

import pytest
import requests
from builders import make_archive
from httpclient import COURSE, STAMP, get, ok, refused, release, until
from hypothesis import given, settings
from hypothesis import strategies as st

from nbexchange.api.base import MAX_ID, check_id
from nbexchange.errors import Invalid

# -- the id rule, as a function ------------------------------------------------------

_BAD = {"Cc", "Cf", "Zl", "Zp"}


def breaks_the_rule(value: str) -> bool:
    """The rule, stated plainly, for the property test to compare against."""
    value = unicodedata.normalize("NFC", value)
    return (
        any(unicodedata.category(c) in _BAD or (unicodedata.category(c) == "Zs" and c != " ") for c in value)
        or value != value.strip()
        or any(bad in value for bad in ("/", "\\", ".."))
        or value in ("", ".")
        or len(value.encode("utf-8")) > MAX_ID
    )


@pytest.mark.hostile(
    "Ids",
    "hypothesis over the id checker: any Unicode text up to 300 characters (and long multi-byte texts near the "
    "255-byte limit), composed and decomposed",
    "refused exactly when it breaks the rule, with a note naming the parameter; else returned in NFC, the same "
    "for its NFD spelling",
)
@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=300) | st.text(st.characters(codec="utf-8"), min_size=60, max_size=130))
def test_the_id_rule(value):
    try:
        checked = check_id("course_id", value)
    except Invalid as e:
        assert breaks_the_rule(value), value
        assert "'course_id'" in e.note
        return
    assert not breaks_the_rule(value), value
    assert checked == unicodedata.normalize("NFC", value)
    assert check_id("course_id", checked) == checked
    # Decomposed or composed, the same id.
    assert check_id("course_id", unicodedata.normalize("NFD", value)) == checked


@pytest.mark.parametrize("value", ["ps1", "Problem Set 1", "café", "課題-1", "a.b", "x" * MAX_ID, "é" * (MAX_ID // 2)])
def test_ordinary_ids_pass(value):
    assert check_id("assignment_id", value) == value


# -- the id rule, on every route ------------------------------------------------------

#: Valid values for every parameter, so that only the one under test is wrong.
BASE = {
    "course_id": COURSE,
    "assignment_id": "ps1",
    "user_id": "s1",
    "path": "x",
    "notebook": "nb1",
    "student": "s1",
    "checksum": "abc",
    "timestamp": STAMP,
}

#: Every (method, route, id parameter) the API takes.
ID_PARAMS = [
    ("GET", "assignments", "course_id"),
    ("GET", "history", "course_id"),
    *[("GET", "events", p) for p in ("course_id", "assignment_id")],
    *[(m, "assignment", p) for m in ("GET", "POST", "DELETE") for p in ("course_id", "assignment_id")],
    ("POST", "assignment", "notebooks"),
    *[("POST", "submission", p) for p in ("course_id", "assignment_id")],
    *[("GET", "collections", p) for p in ("course_id", "assignment_id", "user_id")],
    *[("GET", "collection", p) for p in ("course_id", "assignment_id", "path")],
    *[("GET", "feedback", p) for p in ("course_id", "assignment_id")],
    *[("POST", "feedback", p) for p in ("course_id", "assignment_id", "notebook", "student", "checksum")],
]

HOSTILE_IDS = [
    ("\x00", "U+0000"),
    ("a\tb", "U+0009"),
    ("a\x7fb", "U+007F"),
    ("ps\x85", "U+0085"),
    ("ps\u202e1", "U+202E"),
    ("ps\u200b1", "U+200B"),
    ("ps\ufeff1", "U+FEFF"),
    ("ps\u20281", "U+2028"),
    ("ps\u20291", "U+2029"),
    ("ps\u00a01", "U+00A0"),
    ("ps\u30001", "U+3000"),
    (" ps1", "whitespace"),
    ("ps1 ", "whitespace"),
    ("a/b", "'/'"),
    ("a\\b", "'\\'"),
    ("..", "'..'"),
    ("a..b", "'..'"),
    (".", "'.'"),
    ("é" * 128, "255 bytes"),
    ("x" * 256, "255 bytes"),
]


def send(svc, method: str, route: str, param: str, value: str) -> requests.Response:
    """``route`` with every parameter valid but ``param`` = ``value``."""
    params = dict(BASE)
    data = None
    files = None
    if route in ("assignment", "submission", "feedback") and method == "POST":
        field = "feedback" if route == "feedback" else "assignment"
        files = {field: ("f.tar.gz", make_archive())}
        data = {"notebooks": [value if param == "notebooks" else "nb1"]}
    if param != "notebooks":
        params[param] = value
    return requests.request(
        method, svc.url + route, params=params, data=data, files=files, headers=svc.headers("ada"), timeout=30
    )


@pytest.mark.hostile(
    "Ids",
    "every id parameter of every route (course_id, assignment_id, user_id, path, notebook, student, checksum, form "
    "notebooks) holding a control (U+0000, tab, U+007F, U+0085), format (U+202E, U+200B, U+FEFF) or separator "
    "character (U+2028, U+2029, U+00A0, U+3000), leading or trailing whitespace, '/', '\\', '..', '.', or more "
    "than 255 bytes of UTF-8 (128 'é')",
    "400, the note names the parameter and the rule (the character by its code point)",
)
@pytest.mark.parametrize("method, route, param", ID_PARAMS)
def test_every_id_parameter_follows_the_rule(svc, method, route, param):
    for value, words in HOSTILE_IDS:
        refused(send(svc, method, route, param, value), 400, f"'{param}'", words)


@pytest.mark.hostile(
    "Ids",
    "an assignment id (and a notebook name) sent decomposed (NFD), then read composed (NFC)",
    "the same id: the release answers 201, the list and fetch find it by its NFC spelling; the download's "
    "Content-Disposition names it in UTF-8 (RFC 6266) instead of failing with 500",
)
def test_decomposed_and_composed_ids_are_one(svc):
    composed = "ps-café-Ω"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    released = ok(release(svc, "ada", decomposed, notebooks=(unicodedata.normalize("NFD", "nb-é"),)), 201)
    listed = ok(get(svc, "assignments", "s1", course_id=COURSE, min_position=released["position"]))["value"]
    mine = [item for item in listed if item["assignment_id"] == composed]
    assert mine and [nb["notebook_id"] for nb in mine[0]["notebooks"]] == ["nb-é"], mine
    fetched = until(lambda: (r := get(svc, "assignment", "s1", course_id=COURSE, assignment_id=composed)).ok and r)
    assert fetched.content == make_archive()
    # A Unicode id names the download exactly (RFC 6266), with an ASCII fallback for old clients.
    assert fetched.headers["Content-Disposition"] == (
        "attachment; filename=\"ps-caf_-_.tar.gz\"; filename*=UTF-8''ps-caf%C3%A9-%CE%A9.tar.gz"
    )


# -- numbers and timestamps ------------------------------------------------------------

INT_PARAMS = [("events", "after"), ("events", "limit"), ("assignments", "min_position"), ("history", "min_position")]


@pytest.mark.hostile(
    "Numbers and timestamps",
    "integer parameters (after, limit, min_position) at 2^63, 2^64, a thousand digits, negative, '+5', '1_000', "
    "' 5', Arabic-Indic digits, '5.0', '0x10'",
    "400, the note names the parameter and says a whole number (or its bounds)",
)
@pytest.mark.parametrize("route, param", INT_PARAMS)
@pytest.mark.parametrize(
    "value, words",
    [
        ("9223372036854775808", "between"),
        ("18446744073709551616", "between"),
        ("9" * 1000, "between"),
        ("-1", "between"),
        ("-9223372036854775809", "between"),
        ("+5", "whole number"),
        ("1_000", "whole number"),
        (" 5", "whole number"),
        ("\u0661\u0662", "whole number"),
        ("5.0", "whole number"),
        ("0x10", "whole number"),
    ],
)
def test_integers_beyond_bounds_are_400(svc, route, param, value, words):
    refused(get(svc, route, "ada", course_id=COURSE, **{param: value}), 400, f"'{param}'", words)


def test_the_largest_integers_are_taken(svc):
    assert ok(get(svc, "events", "ada", course_id=COURSE, after=2**63 - 1))["value"] == []
    refused(get(svc, "events", "ada", course_id=COURSE, limit=1001), 400, "'limit'", "between 1 and 1000")


@pytest.mark.hostile(
    "Numbers and timestamps",
    "submission and feedback timestamps whose UTC offset carries them past year 9999 or before year 1 "
    "(9999-12-31T23:59:59-23:59, 0001-01-01T00:00+23:59), offsets of 24 h or more, years 0 and 10000, garbage",
    "400, the note names the parameter and shows the expected format",
)
@pytest.mark.parametrize(
    "stamp",
    [
        "9999-12-31T23:59:59-23:59",
        "9999-12-31 23:59:59.999999-00:01 UTC",
        "0001-01-01T00:00:00+23:59",
        "0001-01-01 00:00:00+00:00:01",
        "2026-01-01T00:00:00+24:00",
        "2026-01-01T00:00:00-99:99",
        "0000-01-01T00:00:00",
        "10000-01-01T00:00:00",
        "2026-13-01",
        "yesterday",
    ],
)
@pytest.mark.parametrize("route", ["submission", "feedback"])
def test_timestamps_out_of_range_are_400(svc, stamp, route):
    params = {**BASE, "timestamp": stamp}
    field = "feedback" if route == "feedback" else "assignment"
    answer = requests.post(
        svc.url + route,
        params=params,
        files={field: ("f.tar.gz", make_archive())},
        headers=svc.headers("ada" if route == "feedback" else "s1"),
        timeout=30,
    )
    refused(answer, 400, "'timestamp'", "2026-01-31 23:59:59.123456 UTC")
