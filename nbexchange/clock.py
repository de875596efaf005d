"""Time for the whole exchange: timezone-aware UTC, made and formatted here only."""

from __future__ import annotations

import functools
from datetime import datetime, timezone

#: nbgrader's own timestamp format, used on the wire and in ``timestamp.txt``
#: (what :func:`format_timestamp` writes, for a moment in UTC).
NBGRADER_FORMAT = "%Y-%m-%d %H:%M:%S.%f %Z"


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """The same moment in UTC; a naive datetime is taken to be UTC already."""
    if moment.tzinfo is timezone.utc:
        return moment
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


# A rebuild formats each event's times for several read models (and SQLite
# stores them as this text): a datetime hashes in nanoseconds, its hash kept,
# but formats in a microsecond. Equal moments have one UTC wall time,
# whatever their offsets, and a naive time never equals an aware one.
@functools.lru_cache(maxsize=1 << 14)
def format_utc_wall(moment: datetime) -> str:
    """The moment's wall time in UTC: ``2026-01-31 23:59:59.123456`` (naive means UTC).

    nbgrader's format without its `` UTC``, and the text SQLite stores.
    """
    # Made in C without strftime's format parsing. The first 26 characters are
    # the wall time (years have 4 digits), cut before the offset: cheaper
    # than removing the time zone first.
    return as_utc(moment).isoformat(" ", "microseconds")[:26]


def parse_utc_wall(text: str) -> datetime:
    """The moment :func:`format_utc_wall` wrote (aware, in UTC)."""
    # Parsed with its offset at once: making a naive time aware costs more.
    return datetime.fromisoformat(text + "+00:00")


def format_timestamp(moment: datetime) -> str:
    """Format a moment in nbgrader's format: ``2026-01-31 23:59:59.123456 UTC``."""
    # The same text as strftime(NBGRADER_FORMAT); projections format one per submission.
    return format_utc_wall(moment) + " UTC"


def format_iso(moment: datetime) -> str:
    """Format a moment as ISO 8601 with microseconds, for the log's canonical encoding."""
    return as_utc(moment).isoformat(timespec="microseconds")


def parse_timestamp(text: str) -> datetime:
    """Parse a client's timestamp: nbgrader's format or ISO 8601; naive means UTC.

    Raises ``ValueError`` for anything else, including a moment whose UTC
    offset moves it outside the years 1 to 9999.
    """
    try:
        # The log's own encoding (format_iso) parses at once: the path taken
        # once per event on every replay.
        return _parse_iso(text)
    except ValueError:
        pass
    text = text.strip()
    for suffix in (" UTC", " Z"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
            break
    # nbgrader's format without its " UTC" is ISO 8601 with a space.
    return _parse_iso(text)


def _parse_iso(text: str) -> datetime:
    try:
        return as_utc(datetime.fromisoformat(text))
    except OverflowError as e:
        # 0001-01-01T00:00+01:00 or 9999-12-31T23:59-01:00: valid text, no moment in datetime's range.
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from e
