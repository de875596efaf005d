"""Time: one way to make, format and parse it, and the fast paths agree with the plain ones."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from nbexchange.clock import NBGRADER_FORMAT, as_utc, format_iso, format_timestamp, parse_timestamp
from nbexchange.db import Moment, make_engine

moments = st.datetimes(
    min_value=datetime(1000, 1, 1),
    max_value=datetime(9998, 12, 31),
    timezones=st.sampled_from([timezone.utc, timezone(timedelta(hours=-7, minutes=-30))]),
)


@given(moments)
def test_nbgrader_format_is_strftime_of_the_utc_moment(moment):
    assert format_timestamp(moment) == as_utc(moment).strftime(NBGRADER_FORMAT)


@given(moments)
def test_both_formats_parse_back_to_the_same_moment(moment):
    assert parse_timestamp(format_timestamp(moment)) == moment
    assert parse_timestamp(format_iso(moment)) == moment


@pytest.mark.parametrize(
    "text",
    [
        "2026-01-31 23:59:59.123456 UTC",
        " 2026-01-31 23:59:59.123456 UTC ",
        "2026-01-31T23:59:59.123456Z",
        "2026-01-31 23:59:59.123456",
    ],
)
def test_clients_timestamps_are_read_as_utc(text):
    assert parse_timestamp(text) == datetime(2026, 1, 31, 23, 59, 59, 123456, tzinfo=timezone.utc)


def test_an_unreadable_timestamp_is_refused():
    with pytest.raises(ValueError):
        parse_timestamp("yesterday")


SQLITE = make_engine("sqlite://").dialect


@given(st.one_of(st.none(), st.datetimes(), moments))
def test_sqlite_moments_are_sqlalchemys_text_of_the_utc_time_and_read_back_as_it(value):
    write = Moment().dialect_impl(SQLITE).bind_processor(SQLITE)
    read = Moment().dialect_impl(SQLITE).result_processor(SQLITE, None)
    stock = sqlite.DATETIME().bind_processor(SQLITE)
    moment = None if value is None else as_utc(value)
    assert write(value) == stock(moment)
    assert read(write(value)) == moment


@pytest.mark.hostile(
    "Numbers and timestamps",
    "hypothesis over the one timestamp parser: any text, and ISO/nbgrader timestamps at datetime's limits with "
    "offsets up to ±23:59, seconds and microseconds in the offset, 24:00 and 99:99",
    "a timezone-aware moment in UTC, or ValueError (answered 400), never another exception",
)
@settings(max_examples=500, deadline=None)
@given(
    st.text(max_size=60)
    | st.builds(
        lambda day, offset, sep, suffix: day.isoformat(sep) + offset + suffix,
        st.datetimes(),
        st.sampled_from(["", "Z", "+23:59", "-23:59", "+00:00:01", "-00:00:00.000001", "+24:00", "+99:99"]),
        st.sampled_from(["T", " "]),
        st.sampled_from(["", " UTC", " Z"]),
    )
)
def test_parse_timestamp_gives_a_utc_moment_or_value_error(text):
    """Whatever a client sends, the one parser answers a moment in UTC or ValueError (a 400), never another error."""
    try:
        moment = parse_timestamp(text)
    except ValueError:
        return
    assert moment.tzinfo is timezone.utc


@pytest.mark.parametrize(
    "text", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+00:00:01", "0001-01-01 00:00+01:00 UTC"]
)
def test_offsets_past_the_calendar_are_value_errors(text):
    with pytest.raises(ValueError, match="outside the years 1 to 9999"):
        parse_timestamp(text)
