"""The idempotency sweep's decisions against an in-memory KV with Vault's check-and-set rules:
which records it erases, that a record claimed between its read and its tombstone survives, that a
claim meeting a live tombstone is told to retry (409), and that passes walk the names in pages.
The real-Vault behaviour is in tests/integration/test_idempotency_sweep.py."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from broker.api.idempotency import TOMBSTONE_SECONDS, IdempotencyInProgress, IdempotencyStore
from broker.backends.vault import VaultClient
from broker.state.kv import CasConflict, KvDocuments
from broker.timeutil import iso

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class MemoryKv(KvDocuments):
    """KV v2 as the sweep sees it: versioned entries, ``cas`` writes, metadata delete, paged LIST."""

    def __init__(self) -> None:
        super().__init__(cast(VaultClient, None), "kb-kv", "idempotency")
        self.entries: dict[str, tuple[dict[str, Any], int]] = {}
        self.before_write: list[Any] = []
        self.pages: list[tuple[str, int]] = []

    async def read(self, name: str) -> tuple[dict[str, Any], int] | None:
        found = self.entries.get(name)
        return None if found is None else (dict(found[0]), found[1])

    async def write(self, name: str, document: dict[str, Any], cas: int) -> int:
        while self.before_write:
            self.before_write.pop(0)()
        current = self.entries.get(name, ({}, 0))[1]
        if current != cas:
            raise CasConflict(name)
        self.entries[name] = (dict(document), cas + 1)
        return cas + 1

    async def delete(self, name: str) -> None:
        self.entries.pop(name, None)

    async def names_page(self, after: str, limit: int) -> list[str]:
        self.pages.append((after, limit))
        return sorted(n for n in self.entries if n > after)[:limit]


def name(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def store(now: datetime = NOW) -> tuple[IdempotencyStore, MemoryKv]:
    s = IdempotencyStore(cast(VaultClient, None), "kb-kv", ttl_seconds=86400, clock=lambda: now)
    kv = MemoryKv()
    s._docs = kv  # the store's one seam to its KV
    return s, kv


def done(expires: datetime) -> dict[str, Any]:
    return {
        "state": "done",
        "fingerprint": "f" * 64,
        "request_id": "r1",
        "lease_until": iso(expires - timedelta(days=1)),
        "expires_at": iso(expires),
        "answer": {"status": 200, "body": {}, "headers": {}},
    }


def test_only_expired_finished_or_dead_records_are_erased() -> None:
    """Expired answers and expired claims whose lease ended go; fresh, in-flight, undatable and
    foreign-named entries stay."""
    s, kv = store()
    hour = timedelta(hours=1)
    kv.entries = {
        name(1): (done(NOW - hour), 1),
        name(2): ({**done(NOW - hour), "state": "pending", "lease_until": iso(NOW - hour)}, 3),
        name(3): (done(NOW + hour), 1),
        name(4): ({**done(NOW - hour), "state": "pending", "lease_until": iso(NOW + hour)}, 1),
        name(5): ({**done(NOW - hour), "expires_at": "yesterday"}, 1),
        "not-ours": (done(NOW - hour), 1),
    }
    counts, after = asyncio.run(s.sweep())
    assert set(kv.entries) == {name(3), name(4), name(5), "not-ours"}
    assert counts == {"examined": 5, "erased": 2, "kept": 3, "contended": 0}
    assert after == ""


def test_a_record_claimed_after_the_sweep_read_it_survives() -> None:
    """A request that takes the expired record between the sweep's read and its tombstone write
    makes the tombstone's check-and-set fail: the new claim is not erased."""
    s, kv = store()
    kv.entries = {name(1): (done(NOW - timedelta(minutes=1)), 4)}
    fresh = {
        **done(NOW + timedelta(days=1)),
        "state": "pending",
        "lease_until": iso(NOW + timedelta(minutes=5)),
    }
    kv.before_write.append(lambda: kv.entries.__setitem__(name(1), (fresh, 5)))
    counts, _ = asyncio.run(s.sweep())
    assert kv.entries[name(1)] == (fresh, 5)
    assert counts["contended"] == 1
    assert counts["erased"] == 0


def test_a_claim_meeting_a_live_tombstone_is_told_to_retry_and_a_lapsed_one_is_replaced() -> None:
    """Between the tombstone and the delete a claim gets 409 (retry), so the delete cannot erase
    it; a tombstone left by a sweep that died lapses after TOMBSTONE_SECONDS and is claimed over."""
    s, kv = store()
    until = NOW + timedelta(seconds=TOMBSTONE_SECONDS)
    kv.entries = {name(1): ({"state": "swept", "swept_until": iso(until), "expires_at": iso(NOW)}, 2)}
    with pytest.raises(IdempotencyInProgress):
        asyncio.run(s.begin(name(1), "f" * 64, "r2"))
    later, kv_later = store(until + timedelta(seconds=1))
    kv_later.entries = dict(kv.entries)
    assert asyncio.run(later.begin(name(1), "f" * 64, "r2")) is None
    assert kv_later.entries[name(1)][0]["state"] == "pending"
    assert kv_later.entries[name(1)][0]["request_id"] == "r2"


def test_passes_walk_the_names_a_bounded_page_at_a_time() -> None:
    """Each pass reads at most ``limit`` names after the previous pass's last, then wraps around."""
    s, kv = store()
    kv.entries = {name(i): (done(NOW + timedelta(hours=1)), 1) for i in range(5)}
    ordered = sorted(kv.entries)
    _, after = asyncio.run(s.sweep("", limit=2))
    assert after == ordered[1]
    _, after = asyncio.run(s.sweep(after, limit=2))
    assert after == ordered[3]
    counts, after = asyncio.run(s.sweep(after, limit=2))
    assert (counts["examined"], after) == (1, "")
    assert kv.pages == [("", 2), (ordered[1], 2), (ordered[3], 2)]


def test_a_replica_whose_clock_runs_ahead_cannot_claim_over_a_tombstone_about_to_be_deleted() -> None:
    """The sweep's delete has no check-and-set: its only guard is the tombstone, which each
    replica judges on its own clock. A replica 90 s ahead (past the 60 s the scheduler allows)
    still sees the tombstone live while the sweeper may delete (within its window), so its claim
    is told to retry (409) instead of landing where the delete then erases it."""
    rid = name(7)
    sweeper, kv = store()
    ticks = iter([NOW, NOW + timedelta(seconds=29)])  # judged and tombstoned, then the window check
    sweeper._clock = lambda: next(ticks, NOW + timedelta(seconds=29))
    ahead, _ = store(NOW + timedelta(seconds=29 + 90))
    ahead._docs = kv
    kv.entries = {rid: (done(NOW - timedelta(minutes=1)), 3)}
    refused: list[BaseException] = []
    erase = MemoryKv.delete

    async def claim_then_delete(self: MemoryKv, victim: str) -> None:
        try:
            await ahead.begin(rid, "f" * 64, "new-request")  # lands between tombstone and delete
        except IdempotencyInProgress as exc:
            refused.append(exc)
        await erase(self, victim)

    kv.delete = claim_then_delete.__get__(kv)  # type: ignore[method-assign]
    counts, _ = asyncio.run(sweeper.sweep())

    assert counts["erased"] == 1
    assert len(refused) == 1  # the claim was refused, so nothing live was erased
    assert rid not in kv.entries
