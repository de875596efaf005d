"""The log's stream prefixes match exactly, byte for byte: case, LIKE's wildcards and non-ASCII ids included."""

from __future__ import annotations

import pytest
from builders import release, submit

from nbexchange.events.sql import _successor

#: Course ids that a case-folding, wildcard-reading or linguistic comparison would confuse with ``phys101``.
LOOK_ALIKES = ["phys101", "PHYS101", "Phys101", "phys1010", "phys101x", "phys_01", "phys%01", "phys101é", "phyſ101"]


@pytest.mark.hostile(
    "Exact ids",
    "reading one course's raw events when other courses' ids differ from it only in case, extend it, or hold "
    "LIKE's wildcards ('_', '%') or non-ASCII letters (PHYS101, phys1010, phys_01, phys%01, phys101é, phyſ101)",
    "only the streams of exactly that course, on SQLite and PostgreSQL",
)
@pytest.mark.parametrize("course", LOOK_ALIKES)
def test_prefixes_match_exactly(store, course):
    for other in LOOK_ALIKES:
        store.append(release(course=other, assignment="ps1"))
        store.append(submit("sam", course=other, assignment="ps1"))
        store.append(submit("Sam", course=other, assignment="PS1"))
    page = store.read_streams(prefixes=[f"assignment/1/{course}/", f"student/1/{course}/"], limit=1000)
    assert sorted(e.stream for e in page) == sorted(
        [f"assignment/1/{course}/ps1", f"student/1/{course}/ps1/sam", f"student/1/{course}/PS1/Sam"]
    )
    one = store.read_streams(prefixes=[f"student/1/{course}/PS1/"], limit=1000)
    assert [e.stream for e in one] == [f"student/1/{course}/PS1/Sam"]


def test_prefixes_and_streams_together_page_in_log_order(store):
    for n in range(5):
        store.append(submit(f"s{n}", course="phys101"))
        store.append(submit(f"s{n}", course="PHYS101"))
    store.append(release(course="phys101"))
    page = store.read_streams(streams=["assignment/1/phys101/ps1"], prefixes=["student/1/phys101/"], limit=4)
    assert [e.stream for e in page] == [f"student/1/phys101/ps1/s{n}" for n in range(4)]
    rest = store.read_streams(
        streams=["assignment/1/phys101/ps1"], prefixes=["student/1/phys101/"], after=page[-1].position
    )
    assert [e.stream for e in rest] == ["student/1/phys101/ps1/s4", "assignment/1/phys101/ps1"]


@pytest.mark.parametrize(
    "prefix, above",
    [
        ("a/", "a0"),
        ("a", "b"),
        ("a\U0010ffff", "b"),
        ("\ud7ff", "\ue000"),  # past the surrogates, which UTF-8 cannot hold
        ("\U0010ffff", None),
        ("", None),
    ],
)
def test_successor_bounds_every_extension(prefix, above):
    assert _successor(prefix) == above
    if above is not None:
        for tail in ("", "\x00", "z", "\U0010ffff" * 3):
            assert prefix + tail < above
