"""Idempotency-Key rules that need no Vault: the header check, the request fingerprint, the
scope hash, and which stored records still count (a malformed one never does)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from broker.api.idempotency import (
    IdempotencyStore,
    InvalidIdempotencyKey,
    fingerprint,
    offered_key,
    record_id,
)
from broker.backends.vault import VaultClient
from broker.timeutil import iso

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _request(*values: str) -> Any:
    headers = CIMultiDict([("Idempotency-Key", v) for v in values])
    return make_mocked_request("POST", "/v1/keys/k/rotate", headers=headers)


def test_header_rules() -> None:
    """1-255 visible ASCII characters, one header; absent is None."""
    assert offered_key(_request()) is None
    assert offered_key(_request("a" * 255)) == "a" * 255
    assert offered_key(_request("../../sys/x")) == "../../sys/x"
    for bad in ("a" * 256, "", "a b", "a\tb", "caf\u00e9", "a\x7f"):
        with pytest.raises(InvalidIdempotencyKey):
            offered_key(_request(bad))
    with pytest.raises(InvalidIdempotencyKey):
        offered_key(_request("one", "two"))


def test_fingerprint_ignores_order_and_spacing_only() -> None:
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert fingerprint({}) != fingerprint({"a": None})


def test_scope_hash_separates_callers_operations_and_keys() -> None:
    """The record name is hex only, and differs when any part of the scope does."""
    base = record_id("spiffe://d/user/a", "key.rotate", "k", "x")
    assert len(base) == 64
    assert int(base, 16) >= 0
    others = {
        record_id("spiffe://d/user/b", "key.rotate", "k", "x"),
        record_id("spiffe://d/user/a", "key.suspend", "k", "x"),
        record_id("spiffe://d/user/a", "key.rotate", "k2", "x"),
        record_id("spiffe://d/user/a", "key.rotate", "k", "y"),
        # A separator inside one part cannot move text into the next.
        record_id("spiffe://d/user/a", "key.rotate", "k\0x", ""),
    }
    assert base not in others
    assert len(others) == 5


def _store() -> IdempotencyStore:
    return IdempotencyStore(cast(VaultClient, None), "kb-kv", ttl_seconds=3600, clock=lambda: NOW)


def _done(**changes: Any) -> dict[str, Any]:
    record = {
        "state": "done",
        "fingerprint": "f",
        "request_id": "r",
        "expires_at": iso(NOW + timedelta(hours=1)),
        "lease_until": iso(NOW + timedelta(minutes=5)),
        "answer": {"status": 200, "body": {}, "headers": {}},
    }
    record.update(changes)
    return record


def test_which_records_count() -> None:
    """A finished or running record counts until it expires; a lapsed lease, an expired or a
    malformed record does not."""
    store = _store()
    assert not store._void(_done(), NOW)
    assert store._void(_done(), NOW + timedelta(hours=1))
    assert not store._void(_done(state="pending"), NOW)
    assert store._void(_done(state="pending"), NOW + timedelta(minutes=5))
    for broken in (
        _done(expires_at="yesterday"),
        _done(expires_at=5),
        _done(fingerprint=None),
        _done(state="weird"),
        _done(answer={"status": "200", "body": {}, "headers": {}}),
        _done(answer={"status": 201, "body": {}, "headers": {"Location": 5}}),
        {k: v for k, v in _done().items() if k != "request_id"},
        _done(request_id=None),
        {"state": "done"},
    ):
        assert store._void(broken, NOW), broken
