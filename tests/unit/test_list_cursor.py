"""Key-listing cursors: sealed names bound to the caller and the filters, never taken for a name."""

from __future__ import annotations

import pytest

from broker.api import list_cursor
from broker.errors import BadRequest
from broker.keys.model import NAME_RE

SECRET = bytes(range(32))
ME, FILTERS = "spiffe://keybroker.test/app/me", {"backend": "vault"}


def test_a_cursor_opens_to_its_name_for_the_same_caller_and_filters() -> None:
    """Round trip for names at both length limits; one position always gives one cursor."""
    for name in ("a", "k" * 63, "pay-2026.v1_x"):
        token = list_cursor.seal(SECRET, ME, FILTERS, name)
        assert list_cursor.is_cursor(token)
        assert name not in token
        assert len(token) <= list_cursor.MAX_CHARS
        assert list_cursor.open_cursor(SECRET, ME, dict(reversed(FILTERS.items())), token) == name
        assert list_cursor.seal(SECRET, ME, FILTERS, name) == token


@pytest.mark.parametrize(
    ("secret", "caller", "filters"),
    [
        (SECRET, "spiffe://keybroker.test/app/other", FILTERS),
        (SECRET, ME, {"backend": "kms"}),
        (SECRET, ME, {}),
        (bytes(32), ME, FILTERS),  # another deployment's key
    ],
)
def test_a_cursor_is_refused_elsewhere(secret: bytes, caller: str, filters: dict[str, str]) -> None:
    """Another caller, other filters or another deployment: 400, never the name."""
    token = list_cursor.seal(SECRET, ME, FILTERS, "hidden-key")
    with pytest.raises(BadRequest, match="'next' of an earlier page"):
        list_cursor.open_cursor(secret, caller, filters, token)


@pytest.mark.parametrize(
    "token",
    ["~c1.", "~c1." + "A" * 39, "~c1." + "A" * 500, "~c1.AAAA=AAAA" + "A" * 40, "~c1.\u0661" * 20, "~c2.abc"],
)
def test_a_malformed_or_edited_cursor_is_refused(token: str) -> None:
    with pytest.raises(BadRequest):
        list_cursor.open_cursor(SECRET, ME, FILTERS, token)
    sealed = list_cursor.seal(SECRET, ME, FILTERS, "hidden-key")
    for i in range(len(list_cursor.PREFIX), len(sealed)):
        edited = sealed[:i] + ("B" if sealed[i] == "A" else "A") + sealed[i + 1 :]
        with pytest.raises(BadRequest):
            list_cursor.open_cursor(SECRET, ME, FILTERS, edited)


def test_no_key_name_looks_like_a_cursor() -> None:
    """The prefix holds a character no key name may: `after=<name>` is never read as a cursor."""
    assert not NAME_RE.fullmatch(list_cursor.PREFIX + "abc")
    assert not NAME_RE.fullmatch(list_cursor.PREFIX[:1])
