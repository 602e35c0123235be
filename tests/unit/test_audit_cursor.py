"""The audit events cursor: round-trips a row's place, and refuses anything it did not give out."""

from __future__ import annotations

import base64

import pytest

from broker.api.audit_routes import _decode_cursor, _encode_cursor, _row_key
from broker.errors import BadRequest


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_cursor_round_trips_and_orders_rows_after_it() -> None:
    """The cursor of a row decodes to its key; a later row (or a Vault row at the same time) sorts after."""
    row = {"source": "broker", "seq": 41, "request_id": "r1", "time": "2026-11-23T10:00:00.123456Z"}
    later = {"source": "broker", "seq": 42, "request_id": "r2", "time": "2026-11-23T10:00:00.123456Z"}
    vault = {"source": "vault", "vault_request_id": "v-1", "time": "2026-11-23T10:00:00.123456Z"}

    key = _decode_cursor(_encode_cursor(_row_key(row)))

    assert key == _row_key(row)
    assert _row_key(later) > key
    assert _row_key(vault) > _row_key(later)


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!not-base64!!!",
        _b64(b"not json"),
        _b64(b'["2026-11-23T10:00:00+00:00"]'),
        _b64(b'["2026-11-23T10:00:00+00:00", 7]'),
        _b64(b'{"a": 1, "b": 2}'),
        _b64(b'["yesterday", "b:1"]'),
        _b64(b"\xff\xfe"),
        "A" * 600,
    ],
)
def test_a_forged_cursor_is_a_bad_request(cursor: str) -> None:
    """Malformed, wrongly typed or oversized cursors are a 400 naming the parameter, never a 500."""
    with pytest.raises(BadRequest, match="'cursor' must be 'start'"):
        _decode_cursor(cursor)
