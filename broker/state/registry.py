"""The key registry: one Vault KV v2 entry per key, every write check-and-set.

Two broker replicas may change the same key at once; the loser of a write re-reads
and re-applies its change (:class:`broker.state.kv.KvDocuments`), so no version and
no state change is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from broker.backends.vault import VaultClient
from broker.errors import BadGateway, Conflict, NotFound
from broker.keys.model import NAME_RE, Key, check_name
from broker.state.kv import CasConflict, KvDocuments

# Entries read from Vault at once while listing: enough to hide the round trip, few enough
# that a listing of 10,000 keys does not open 10,000 requests against Vault at the same time.
READ_CONCURRENCY = 16


class Registry:
    def __init__(self, vault: VaultClient, kv_mount: str, prefix: str = "keys") -> None:
        self._docs = KvDocuments(vault, kv_mount, prefix)

    async def read(self, name: str) -> tuple[Key, int] | None:
        """The key and its KV version (for check-and-set), or None."""
        found = await self._docs.read(check_name(name))
        if found is None:
            return None
        key = Key.from_json(found[0])
        if key.name != name:
            # An entry that names another key (written around the broker) is not this key.
            raise BadGateway(f"registry entry {name} holds key {key.name!r}; refusing to use it")
        return key, found[1]

    async def get(self, name: str) -> Key:
        found = await self.read(name)
        if found is None:
            raise NotFound(f"no key named {name!r}")
        return found[0]

    async def write(self, key: Key, cas: int) -> int:
        """Write if the entry is still at KV version ``cas`` (0: must not exist); return the new version."""
        return await self._docs.write(check_name(key.name), key.to_json(), cas)

    async def create(self, key: Key) -> None:
        try:
            await self.write(key, 0)
        except CasConflict:
            raise Conflict(f"a key named {key.name!r} already exists") from None

    async def delete(self, name: str) -> None:
        """Forget a key entirely (only for a creation that never produced material)."""
        await self._docs.delete(check_name(name))

    async def update(self, name: str, change: Callable[[Key], Key | Awaitable[Key]]) -> Key:
        """Read, apply ``change``, write check-and-set; retry on conflict. ``change`` may raise to refuse."""

        async def apply(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None:
                raise NotFound(f"no key named {name!r}")
            result = change(Key.from_json(current))
            new = await result if isinstance(result, Awaitable) else result
            return new.to_json()

        written, _ = await self._docs.update(check_name(name), apply)
        return Key.from_json(written)

    async def names(self) -> list[str]:
        """Entries whose name breaks the name rule (written around the broker) are not keys."""
        return [n for n in await self._docs.names() if NAME_RE.fullmatch(n)]

    async def scan(self, after: str | None = None) -> AsyncGenerator[Key, None]:
        """The keys in name order, from the first name after ``after``: one Vault listing, then
        entries read :data:`READ_CONCURRENCY` at a time, only as far as the caller iterates."""
        names = [n for n in await self.names() if after is None or n > after]
        for start in range(0, len(names), READ_CONCURRENCY):
            chunk = names[start : start + READ_CONCURRENCY]
            for found in await asyncio.gather(*(self.read(n) for n in chunk)):
                if found is not None:  # deleted between the listing and the read
                    yield found[0]

    async def all(self) -> list[Key]:
        return [key async for key in self.scan()]
