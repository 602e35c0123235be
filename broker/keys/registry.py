"""The key registry: one Vault KV v2 entry per key, every write check-and-set.

Two broker replicas may change the same key at once; KV v2's ``cas`` makes the
loser's write fail instead of silently overwriting, and :meth:`Registry.update`
re-reads and re-applies the change. So no version and no state change is lost,
and no lock server is needed.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from broker.backends.vault import VaultClient, vault_status
from broker.errors import BadGateway, Conflict, NotFound, Unavailable
from broker.keys.model import Key
from broker.log import get_logger

log = get_logger(__name__)
# Enough for dozens of writers on one key; each attempt is two short Vault calls.
MAX_ATTEMPTS = 200


class CasConflict(Exception):
    """Someone else wrote the entry since it was read."""


class Registry:
    def __init__(self, vault: VaultClient, kv_mount: str, prefix: str = "keys") -> None:
        self._vault = vault
        self._mount = kv_mount
        self._prefix = prefix

    def _data(self, name: str) -> str:
        return f"v1/{self._mount}/data/{self._prefix}/{name}"

    async def read(self, name: str) -> tuple[Key, int] | None:
        """The key and its KV version (for check-and-set), or None."""
        try:
            out = await self._vault.request("GET", self._data(name), what="registry read")
        except NotFound:
            return None
        data = out.get("data") or {}
        if not data.get("data"):  # deleted or destroyed KV version
            return None
        return Key.from_json(data["data"]), int(data["metadata"]["version"])

    async def get(self, name: str) -> Key:
        found = await self.read(name)
        if found is None:
            raise NotFound(f"no key named {name!r}")
        return found[0]

    async def write(self, key: Key, cas: int) -> int:
        """Write if the entry is still at KV version ``cas`` (0: must not exist); return the new version."""
        try:
            out = await self._vault.request(
                "POST",
                self._data(key.name),
                {"options": {"cas": cas}, "data": key.to_json()},
                what="registry write",
            )
        except BadGateway as exc:
            cause = exc.__cause__
            if vault_status(exc) == 400 and "check-and-set" in str(cause):
                raise CasConflict(key.name) from exc
            raise
        return int((out.get("data") or {}).get("version", cas + 1))

    async def create(self, key: Key) -> None:
        try:
            await self.write(key, 0)
        except CasConflict:
            raise Conflict(f"a key named {key.name!r} already exists") from None

    async def delete(self, name: str) -> None:
        """Forget a key entirely (only for a creation that never produced material)."""
        await self._vault.request(
            "DELETE", f"v1/{self._mount}/metadata/{self._prefix}/{name}", what="registry delete"
        )

    async def update(self, name: str, change: Callable[[Key], Key | Awaitable[Key]]) -> Key:
        """Read, apply ``change``, write check-and-set; retry on conflict. ``change`` may raise to refuse."""
        for attempt in range(MAX_ATTEMPTS):
            found = await self.read(name)
            if found is None:
                raise NotFound(f"no key named {name!r}")
            current, cas = found
            result = change(current)
            new = await result if isinstance(result, Awaitable) else result
            if new == current:
                return current
            try:
                await self.write(new, cas)
            except CasConflict:
                # Back off a little, more as contention grows, so writers spread out.
                await asyncio.sleep(random.uniform(0, min(0.002 * (attempt + 1), 0.05)))  # noqa: S311
                continue
            return new
        raise Unavailable(f"key {name}: gave up after {MAX_ATTEMPTS} conflicting concurrent updates")

    async def names(self) -> list[str]:
        try:
            out = await self._vault.request(
                "GET", f"v1/{self._mount}/metadata/{self._prefix}?list=true", what="registry list"
            )
        except NotFound:
            return []
        return sorted(str(k) for k in (out.get("data") or {}).get("keys", []) if not str(k).endswith("/"))

    async def all(self) -> list[Key]:
        keys = []
        for name in await self.names():
            found = await self.read(name)
            if found is not None:
                keys.append(found[0])
        return keys
