"""Grants in Vault KV: one entry per key (``grants/<key>``) holding that key's grants.

Grants are read fresh from Vault when a request needs one (only when no rule of
the caller's roles already allows it), so a revoke or retire through any replica
takes effect on every replica at once. Expired grants stop working at the second
they expire (the engine compares with the clock) and are purged from storage by
the scheduler and by every write.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from broker import periodic
from broker.backends.vault import VaultClient
from broker.errors import BadRequest, Forbidden, NotFound
from broker.log import get_logger
from broker.policy import engine
from broker.policy.model import Grant, KeyFacts, Principal
from broker.state.kv import KvDocuments
from broker.state.policies import Snapshot

log = get_logger(__name__)


# The longest any grant may last (100 years), whatever the policy's grant_max_expires_in.
MAX_GRANT_SECONDS = 100 * 366 * 24 * 3600


def new_grant_id() -> str:
    return "g-" + secrets.token_hex(10)


@dataclass(frozen=True)
class GrantAsk:
    """What a granter asked for, parsed: the rules about it are :func:`build_grant`'s."""

    grantee: str
    operations: tuple[str, ...]
    expires_in: int | None  # seconds; None when missing or not a duration
    context_equals: Mapping[str, str] | None = None
    context_subset: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.context_equals is not None and self.context_subset is not None:
            raise BadRequest("give at most one of context_equals and context_subset")


def build_grant(
    ask: GrantAsk, *, granter: Principal, key: KeyFacts, policy: Snapshot, now: datetime, grant_id: str
) -> Grant:
    """The grant ``granter`` may issue for ``ask`` under ``policy``, or the reason it may not.

    The expiry is required and capped by the policy's ``grant_max_expires_in``; the grant
    gives no operation the granter's own rules would not allow within its context
    constraint, now.
    """
    equals, subset = ask.context_equals, ask.context_subset
    # The policy's limit has no upper bound of its own; past about a century an expiry would soon
    # not fit a datetime (year 9999), so no grant outlives this, whatever the document says.
    limit = min(policy.policy.settings.grant_max_seconds, MAX_GRANT_SECONDS)
    seconds = ask.expires_in
    if seconds is None or not 1 <= seconds <= limit:
        raise BadRequest(f"'expires_in' is required: a duration from 1s to {limit}s (e.g. 3600, 90m, 12h)")
    beyond = engine.exceeds_granter(policy.effective, granter, key, ask.operations, equals, subset, now=now)
    if beyond:
        scope = "" if equals is None and subset is None else " within that context constraint"
        raise Forbidden(
            f"a grant cannot give more than its granter holds: you may not {', '.join(beyond)} "
            f"on key {key.name}{scope}"
        )
    return Grant(
        id=grant_id,
        key=key.name,
        grantee=ask.grantee,
        operations=ask.operations,
        created_at=now,
        expires_at=now + timedelta(seconds=seconds),
        granter=granter.id,
        context_equals=None if equals is None else dict(equals),
        context_subset=None if subset is None else dict(subset),
    )


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

    async def issue(self, ask: GrantAsk, *, granter: Principal, key: KeyFacts, policy: Snapshot) -> Grant:
        """Build the grant by :func:`build_grant`'s rules and store it.

        ``policy`` must be read fresh from Vault, not a replica's cache: a grant outlives
        the refresh interval, so a granter whose role was just removed through another
        replica must not mint one here.
        """
        grant = build_grant(
            ask, granter=granter, key=key, policy=policy, now=self._clock(), grant_id=new_grant_id()
        )
        await self.add(grant)
        return grant

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


async def grant_purge_loop(grants: GrantStore, interval: float) -> None:
    """Purge expired grants every ``interval`` seconds until cancelled; a failure waits for the next round."""
    await periodic.every(interval, grants.purge_expired, what="grant_purge")
