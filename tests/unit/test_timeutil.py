"""The one time module: ISO spelling, durations read and written back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from broker.timeutil import duration_seconds, format_duration, iso, parse_duration, parse_iso


def test_iso_is_utc_with_z_and_reads_back() -> None:
    """Any aware time is written in UTC with Z, and read back to the same instant."""
    moment = datetime(2026, 11, 23, 13, 0, tzinfo=timezone(timedelta(hours=1)))

    assert iso(moment) == "2026-11-23T12:00:00Z"
    assert moment == parse_iso(iso(moment))
    assert parse_iso(iso(moment)).tzinfo == UTC


@pytest.mark.parametrize(
    ("text", "seconds"), [("3600", 3600), ("45s", 45), ("90m", 5400), ("12h", 43200), ("7d", 604800)]
)
def test_durations_read_and_write_back(text: str, seconds: int) -> None:
    """Each unit reads to seconds, and the seconds are written in the shortest exact spelling."""
    assert seconds == duration_seconds(text)
    assert seconds == duration_seconds(format_duration(seconds))


@pytest.mark.parametrize("text", ["", "1.5h", "-1", "1w", " 1h", "1h ", "\uff11h"])
def test_exact_duration_refuses_other_spellings(text: str) -> None:
    """duration_seconds takes one canonical spelling; spaces only parse_duration forgives."""
    assert duration_seconds(text) is None


def test_parse_duration_takes_integers_and_trims() -> None:
    """Integers pass as seconds, booleans and other types are not durations."""
    assert (
        parse_duration(60),
        parse_duration(" 1h "),
        parse_duration(True),
        parse_duration(1.5),
    ) == (60, 3600, None, None)
