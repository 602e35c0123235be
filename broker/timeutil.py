"""Time in one spelling: aware UTC datetimes, ISO 8601 with ``Z``, durations like ``90m``."""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Any

# A duration as callers and policy documents write it: digits and an optional unit.
_DURATION = re.compile(r"([0-9]{1,10})([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def now_utc() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """``2026-11-23T12:00:00Z``: UTC, with ``Z`` rather than ``+00:00``."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def iso_or_none(moment: datetime | None) -> str | None:
    return None if moment is None else iso(moment)


def parse_iso(value: str) -> datetime:
    """What :func:`iso` wrote (or any ISO 8601 time with an offset) back to a datetime."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# What the broker and Vault write, which datetime.fromisoformat reads as it is (a longer fraction
# is cut to microseconds); anything else goes the long way.
_PLAIN_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)")
_FRACTION = re.compile(r"\d*")


# Records written in one batch share their time: the same text is parsed once.
@functools.lru_cache(maxsize=1024)
def parse_time(value: str) -> datetime:
    """ISO 8601 with any number of fractional digits (Vault writes nanoseconds) to an aware datetime."""
    text = value.strip()
    if _PLAIN_ISO.fullmatch(text):
        return datetime.fromisoformat(text)
    text = text.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:
        digits = _FRACTION.match(rest)
        fraction = digits.group() if digits else ""
        # Only the fraction's own digits: an offset after it (+01:00) stays the offset.
        text = f"{head}.{fraction[:6].ljust(6, '0')}{rest[len(fraction) :]}"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def duration_seconds(text: str) -> int | None:
    """Seconds from exactly ``<digits>[s|m|h|d]`` (``3600``, ``90m``, ``7d``); None otherwise."""
    m = _DURATION.fullmatch(text)
    return None if m is None else int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def parse_duration(value: Any) -> int | None:
    """Seconds from an integer or a duration string (surrounding spaces ignored); None if neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        return duration_seconds(value.strip())
    return None


def parse_iso_or_none(value: str | None) -> datetime | None:
    return parse_iso(value) if value else None


def format_duration(seconds: int) -> str:
    """The shortest exact spelling :func:`duration_seconds` reads back: ``90d``, ``12h``, ``90m``, ``45s``."""
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
