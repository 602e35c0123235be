"""Grants in Vault KV: one entry per key (``grants/<key>``) holding that key's grants.

Grants are read fresh from Vault when a request needs one (only when no rule of
the caller's roles already allows it), so a revoke or retire through any replica
takes effect on every replica at once. Expired grants stop working at the second
they expire (the engine compares with the clock) and are purged from storage by
the scheduler and by every write.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import datetime
from typing import Any

from broker.backends.vault import VaultClient
from broker.errors import NotFound
from broker.log import get_logger
from broker.policy.model import Grant
from broker.state.kv import KvDocuments

log = get_logger(__name__)


def new_grant_id() -> str:
    return "g-" + secrets.token_hex(10)


class GrantStore:
    def __init__(self, vault: VaultClient, kv_mount: str, *, clock: Callable[[], datetime]) -> None:
        self._docs = KvDocuments(vault, kv_mount, "grants")
        self._clock = clock

    async def for_key(self, key: str) -> list[Grant]:
        """The key's grants that have not expired."""
        found = await self._docs.read(key)
        if found is None:
            return []
        now = self._clock()
        return [g for g in _grants(found[0]) if not g.expired(now)]

    async def get(self, key: str, grant_id: str) -> Grant:
        for grant in await self.for_key(key):
            if grant.id == grant_id:
                return grant
        raise NotFound(f"key {key} has no grant {grant_id} (it may have expired)")

    async def add(self, grant: Grant) -> None:
        def change(current: dict[str, Any] | None) -> dict[str, Any]:
            kept = self._unexpired(current)
            return {"grants": [g.to_json() for g in [*kept, grant]]}

        await self._docs.update(grant.key, change)

    async def remove(self, key: str, grant_id: str) -> Grant:
        """Delete one grant (revoke or retire); NotFound if it is not there (or has expired)."""
        removed: list[Grant] = []

        def change(current: dict[str, Any] | None) -> dict[str, Any]:
            removed.clear()
            kept: list[Grant] = []
            for g in self._unexpired(current):
                (removed if g.id == grant_id else kept).append(g)
            if not removed:
                raise NotFound(f"key {key} has no grant {grant_id} (it may have expired)")
            return {"grants": [g.to_json() for g in kept]}

        await self._docs.update(key, change)
        return removed[0]

    async def purge_expired(self) -> int:
        """Drop expired grants from storage everywhere; return how many went."""
        purged = 0
        for key in await self._docs.names():
            found = await self._docs.read(key)
            if found is None:
                continue
            now = self._clock()
            if not any(g.expired(now) for g in _grants(found[0])):
                continue
            before = len(_grants(found[0]))

            def change(current: dict[str, Any] | None) -> dict[str, Any]:
                return {"grants": [g.to_json() for g in self._unexpired(current)]}

            written, _ = await self._docs.update(key, change)
            purged += before - len(written["grants"])
        if purged:
            log.info("grants_purged", count=purged)
        return purged

    def _unexpired(self, document: dict[str, Any] | None) -> list[Grant]:
        now = self._clock()
        return [g for g in _grants(document) if not g.expired(now)]


def _grants(document: dict[str, Any] | None) -> list[Grant]:
    return [Grant.from_json(g) for g in (document or {}).get("grants", [])]
