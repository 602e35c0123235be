"""JSON documents in Vault KV v2, every write check-and-set.

Several broker replicas share one Vault. KV v2's ``cas`` option makes a write fail
when someone else wrote the entry since it was read, instead of silently
overwriting it; :meth:`KvDocuments.update` re-reads and re-applies the change. So
no change is lost and no lock server is needed.
"""

from __future__ import annotations

import asyncio
import random
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from broker.backends.vault import VaultClient, vault_path
from broker.errors import BadGateway, NotFound, Unavailable

# Enough for dozens of writers on one entry; each attempt is two short Vault calls.
MAX_ATTEMPTS = 200


class CasConflict(Exception):
    """Someone else wrote the entry since it was read."""


class KvDocuments:
    """Entries under ``<mount>/data/<prefix>/``: read with their KV version, written with ``cas``."""

    def __init__(self, vault: VaultClient, mount: str, prefix: str) -> None:
        self._vault = vault
        self._mount = mount
        self._prefix = prefix

    def _data(self, name: str) -> str:
        return vault_path(f"{self._mount}/data/{self._prefix}", name)

    async def read(self, name: str) -> tuple[dict[str, Any], int] | None:
        """The document and its KV version (for check-and-set), or None if there is none."""
        try:
            out = await self._vault.request("GET", self._data(name), what=f"{self._prefix} read")
        except NotFound:
            return None
        data = out.get("data") or {}
        if not data.get("data"):  # deleted or destroyed KV version
            return None
        return dict(data["data"]), int(data["metadata"]["version"])

    async def write(self, name: str, document: dict[str, Any], cas: int) -> int:
        """Write if the entry is still at KV version ``cas`` (0: must not exist); return the new version."""
        try:
            out = await self._vault.request(
                "POST",
                self._data(name),
                {"options": {"cas": cas}, "data": document},
                what=f"{self._prefix} write",
            )
        except BadGateway as exc:
            if exc.says(400, "check-and-set"):
                raise CasConflict(name) from exc
            raise
        return int((out.get("data") or {}).get("version", cas + 1))

    async def write_latest(self, name: str, document: dict[str, Any]) -> None:
        """Write without check-and-set: for a value only this writer ever sets (last one wins)."""
        await self._vault.request("POST", self._data(name), {"data": document}, what=f"{self._prefix} write")

    async def delete(self, name: str) -> None:
        """Forget the entry and all its versions."""
        await self._vault.request(
            "DELETE",
            vault_path(f"{self._mount}/metadata/{self._prefix}", name),
            what=f"{self._prefix} delete",
        )

    async def update(
        self,
        name: str,
        change: Callable[[dict[str, Any] | None], dict[str, Any] | Awaitable[dict[str, Any]]],
    ) -> tuple[dict[str, Any], int]:
        """Read, apply ``change`` (None when absent), write check-and-set; retry on conflict.

        ``change`` may raise to refuse; returning the document unchanged writes nothing.
        Returns the document as written and its KV version.
        """
        for attempt in range(MAX_ATTEMPTS):
            found = await self.read(name)
            current, cas = found if found is not None else (None, 0)
            result = change(current)
            new = await result if isinstance(result, Awaitable) else result
            if new == current and current is not None:
                return current, cas
            try:
                version = await self.write(name, new, cas)
            except CasConflict:
                # Back off a little, more as contention grows, so writers spread out.
                await asyncio.sleep(random.uniform(0, min(0.002 * (attempt + 1), 0.05)))  # noqa: S311
                continue
            return new, version
        raise Unavailable(
            f"{self._prefix}/{name}: gave up after {MAX_ATTEMPTS} conflicting concurrent updates"
        )

    async def names_page(self, after: str, limit: int) -> list[str]:
        """At most ``limit`` entry names after ``after`` in name order (OpenBao's paginated LIST),
        so a caller can walk a large prefix a bounded piece at a time."""
        params: dict[str, str | int] = {"list": "true", "limit": limit}
        if after:
            params["after"] = after
        query = urllib.parse.urlencode(params)
        try:
            out = await self._vault.request(
                "GET",
                vault_path(f"{self._mount}/metadata/{self._prefix}") + "?" + query,
                what=f"{self._prefix} list",
            )
        except NotFound:
            return []
        keys = (out.get("data") or {}).get("keys", [])
        return sorted(str(k) for k in keys if not str(k).endswith("/"))[:limit]

    async def names(self) -> list[str]:
        try:
            out = await self._vault.request(
                "GET",
                vault_path(f"{self._mount}/metadata/{self._prefix}") + "?list=true",
                what=f"{self._prefix} list",
            )
        except NotFound:
            return []
        return sorted(str(k) for k in (out.get("data") or {}).get("keys", []) if not str(k).endswith("/"))
