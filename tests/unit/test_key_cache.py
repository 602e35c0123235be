"""The key metadata cache of crypto requests: fresh within cache_seconds, updated by this replica's writes."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from broker.keys.model import Key, State
from broker.keys.service import KeyService
from tests.unit.test_key_model import active_key


class CountingRegistry:
    """Stands in for the Vault KV registry: counts reads, applies updates."""

    def __init__(self, key: Key) -> None:
        self.key = key
        self.reads = 0

    async def get(self, name: str) -> Key:
        self.reads += 1
        return self.key

    async def update(self, name: str, change: Any) -> Key:
        self.key = change(self.key)
        return self.key


def service(registry: CountingRegistry, clock: list[float], seconds: float) -> KeyService:
    return KeyService(registry, {}, cache_seconds=seconds, monotonic=lambda: clock[0])  # type: ignore[arg-type]


def test_crypto_reads_hit_vault_once_per_cache_window() -> None:
    """Three reads inside the window cost one registry read; after it, one more."""
    registry, clock = CountingRegistry(active_key()), [100.0]
    keys = service(registry, clock, 1.0)

    async def run() -> list[int]:
        seen = []
        for step in (0.0, 0.3, 0.9, 1.2):
            clock[0] = 100.0 + step
            await keys.cached("k")
            seen.append(registry.reads)
        return seen

    assert asyncio.run(run()) == [1, 1, 1, 2]


def test_a_change_through_this_replica_is_seen_at_once() -> None:
    """Another replica's suspend is not seen inside the window; a revoke through this one is, at once."""
    registry, clock = CountingRegistry(active_key()), [100.0]
    keys = service(registry, clock, 60.0)

    async def run() -> tuple[State, State, State]:
        before = (await keys.cached("k")).state
        registry.key = replace(registry.key, state=State.SUSPENDED)  # as another replica would write it
        stale = (await keys.cached("k")).state
        await keys.revoke("k", "retired")
        return before, stale, (await keys.cached("k")).state

    assert asyncio.run(run()) == (State.ACTIVE, State.ACTIVE, State.DEACTIVATED)


def test_cache_seconds_zero_reads_vault_every_time() -> None:
    registry, clock = CountingRegistry(active_key()), [100.0]
    keys = service(registry, clock, 0.0)

    async def run() -> int:
        for _ in range(3):
            await keys.cached("k")
        return registry.reads

    assert asyncio.run(run()) == 3
