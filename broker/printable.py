"""Quoting a caller's value in an error, and checking stored text is printable.

An error detail goes to the caller, the broker log and the audit record. A value the
caller sent is quoted there only through :func:`shown`: at most :data:`SHOWN_CHARS`
characters, non-printable ones escaped, so one request can neither write megabytes into
the audit log nor put terminal control sequences in front of whoever reads it.
"""

from __future__ import annotations

SHOWN_CHARS = 64


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` quoted for an error message: repr-escaped, cut to ``limit`` characters and marked so."""
    text = str(value)
    cut = len(text) > limit
    # ascii() escapes every non-printable (and non-ASCII) character; quoting shows where it ends.
    quoted = ascii(text[:limit])
    return f"{quoted}... ({len(text)} characters)" if cut else quoted


def first_unprintable(value: str) -> int | None:
    """Index of the first character that is not printable text (C0/C1 controls, DEL, format
    characters such as bidi overrides, line and paragraph separators), or None."""
    for i, char in enumerate(value):
        if not char.isprintable():
            return i
    return None


def unprintable_reason(value: str, where: str) -> str | None:
    """Why ``value`` is not printable text, naming the character by code point, or None if it is."""
    index = first_unprintable(value)
    if index is None:
        return None
    return (
        f"{where} must be printable text: character {index + 1} is U+{ord(value[index]):04X}, a control "
        "or format character (newline, tab, ESC and the like are refused)"
    )
