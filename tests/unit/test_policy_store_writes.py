"""PolicyStore.write: every change is merged into what Vault holds at the moment of writing.

A fake KV v2 with check-and-set stands in for Vault (the real-stack tests are in
tests/integration/test_policy_races.py and test_policy_invalid.py).
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import pytest

from broker.errors import BadGateway, Conflict, NotFound
from broker.policy.document import to_document
from broker.state.policies import PolicyStore, Stored, default_policy

APP = "spiffe://bank.example/app/app"
GONE = "spiffe://bank.example/user/gone"


class CasVault:
    """KV v2 for one entry: reads give data and version; writes need the current version as cas."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = copy.deepcopy(document)
        self.version = 1
        self.writes = 0
        # Called before each write is applied: another replica's change landing in between.
        self.before_write: Callable[[], None] | None = None

    async def request(self, method: str, path: str, body: Any = None, *, what: str) -> dict[str, Any]:
        if method == "GET":
            if self.document is None:
                raise NotFound("no such path")
            return {"data": {"data": copy.deepcopy(self.document), "metadata": {"version": self.version}}}
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None
            hook()
        if body["options"]["cas"] != self.version:
            raise BadGateway(
                "vault: 400",
                upstream_status=400,
                reasons=("check-and-set parameter did not match the current version",),
            )
        self.document, self.version, self.writes = (
            copy.deepcopy(body["data"]),
            self.version + 1,
            self.writes + 1,
        )
        return {"data": {"version": self.version}}


def _document(**bindings: list[str]) -> dict[str, Any]:
    doc = to_document(default_policy())
    doc["bindings"] = {APP: ["application"], **{k.replace("_", "/"): v for k, v in bindings.items()}}
    return doc


def _store(vault: CasVault) -> PolicyStore:
    return PolicyStore(vault, "kb-kv")  # type: ignore[arg-type]


def _keep_bindings(roles: dict[str, Any]) -> Callable[[Stored], dict[str, Any]]:
    def build(stored: Stored) -> dict[str, Any]:
        kept = stored.bindings()
        assert kept is not None
        return {"roles": roles, "bindings": kept}

    return build


def test_a_stale_cache_never_brings_a_removed_binding_back() -> None:
    """The cache still binds GONE; Vault no longer does: a roles-only write keeps Vault's bindings."""
    vault = CasVault({**_document(), "bindings": {APP: ["application"], GONE: ["developer"]}})
    store = _store(vault)
    asyncio.run(store.load())  # the cache now binds GONE
    vault.document = _document()  # another replica removed it: version 2
    vault.version = 2
    roles = {**_document()["roles"], "extra": {"rules": [{"operations": ["key.read"]}]}}

    snap = asyncio.run(store.write(_keep_bindings(roles), expected_version=2))

    assert GONE not in vault.document["bindings"]
    assert (snap.version, vault.version, store.current().version) == (3, 3, 3)


def test_a_stated_version_that_is_not_current_is_a_conflict_and_nothing_is_written() -> None:
    """expected_version 1 while Vault holds 2: 409, even though this replica's cache says 1."""
    vault = CasVault(_document())
    store = _store(vault)
    asyncio.run(store.load())
    vault.version = 2

    with pytest.raises(Conflict, match="at version 2, not 1"):
        asyncio.run(store.write(_keep_bindings(_document()["roles"]), expected_version=1))
    assert vault.writes == 0


def test_a_change_landing_between_read_and_write_is_merged_or_refused() -> None:
    """Without a stated version the write re-reads and keeps the racing binding; with one, 409."""
    roles = {**_document()["roles"], "extra": {"rules": [{"operations": ["key.read"]}]}}
    vault = CasVault(_document())
    store = _store(vault)

    def race() -> None:
        vault.document = {**_document(), "bindings": {APP: ["application"], GONE: ["developer"]}}
        vault.version += 1

    vault.before_write = race
    asyncio.run(store.write(_keep_bindings(roles)))
    merged = copy.deepcopy(vault.document)
    vault.before_write = race
    with pytest.raises(Conflict):
        asyncio.run(store.write(_keep_bindings(_document()["roles"]), expected_version=vault.version))

    assert merged["bindings"][GONE] == ["developer"]
    assert "extra" in merged["roles"]


def test_bindings_are_read_from_an_invalid_stored_document() -> None:
    """A document that does not validate still yields its bindings as stored, or None if unreadable."""
    broken = {**_document(), "roles": {"x": {"rules": [{"operations": ["nope"]}]}}}
    vault = CasVault(broken)
    stored = asyncio.run(_store(vault).stored())
    vault.document = {**broken, "bindings": "app=application"}
    unreadable = asyncio.run(_store(vault).stored())

    assert stored.invalid
    assert stored.problems
    assert stored.bindings() == {APP: ["application"]}
    assert unreadable.bindings() is None


class SlowFirstRead(CasVault):
    """The first read answers only when told: a refresh that read Vault before a write and
    comes back after it."""

    def __init__(self, document: dict[str, Any]) -> None:
        super().__init__(document)
        self.release = asyncio.Event()
        self.reading = asyncio.Event()
        self.slow = True

    async def request(self, method: str, path: str, body: Any = None, *, what: str) -> dict[str, Any]:
        if method == "GET" and self.slow:
            self.slow = False
            answer = await super().request(method, path, body, what=what)  # read now, answer later
            self.reading.set()
            await self.release.wait()
            return answer
        return await super().request(method, path, body, what=what)


def test_a_refresh_that_read_before_a_write_does_not_bring_the_old_document_back() -> None:
    """A binding removed through this replica stays removed: the refresh under way read the
    document before the removal and finished after it (it replaced the newer snapshot, and the
    removed principal was allowed again until the next refresh)."""
    vault = SlowFirstRead(_document(**{GONE: ["application"]}))

    async def run() -> tuple[int, bool]:
        store = _store(vault)
        vault.slow = False
        await store.load()  # version 1, with the binding
        vault.slow = True
        refresh = asyncio.create_task(store.load())
        await vault.reading.wait()
        written = await store.write(lambda stored: {**_document(), "roles": stored.raw["roles"]})  # type: ignore[index]
        vault.release.set()
        await refresh
        return written.version, GONE in store.current().policy.bindings

    version, still_bound = asyncio.run(run())
    assert version == 2
    assert not still_bound


def test_a_document_written_anew_at_a_lower_version_is_still_read() -> None:
    """Deleted in Vault and written again (KV versions start over): with no write through this
    replica in between, the refresh takes the lower version."""
    vault = CasVault(_document(**{GONE: ["application"]}))

    async def run() -> bool:
        store = _store(vault)
        vault.version = 7
        await store.load()
        vault.document, vault.version = _document(), 1
        await store.load()
        return GONE in store.current().policy.bindings

    assert not asyncio.run(run())
