"""A key creation that did not finish: its name is neither lost to a late transit key nor held for ever.

Before: a creation whose backend call timed out after being sent (504 ``outcome_unknown``) freed
the name at once; Vault then made the transit key late, and every later creation of that name
was refused as a squatted name (409 "the broker did not create"), for good. And a failure to
free the name (Vault away) answered with that failure instead of the creation's own error, and
left a reservation nothing could remove.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.errors import BrokerError, Conflict, OutcomeUnknown, Unavailable
from broker.keys.model import Key, State
from broker.keys.service import KeyService, NewKey
from broker.vocab import Backend, KeyType

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
LEASE = 48.0


class Registry:
    """Stands in for the Vault KV registry: create is check-and-set on absence, update applies."""

    def __init__(self) -> None:
        self.keys: dict[str, Key] = {}
        self.delete_fails = False

    async def create(self, key: Key) -> None:
        if key.name in self.keys:
            raise Conflict(f"a key named {key.name!r} already exists")
        self.keys[key.name] = key

    async def get(self, name: str) -> Key:
        return self.keys[name]

    async def update(self, name: str, change: Any) -> Key:
        self.keys[name] = change(self.keys[name])
        return self.keys[name]

    async def delete(self, name: str) -> None:
        if self.delete_fails:
            raise Unavailable("vault: cannot connect", backend="vault")
        del self.keys[name]


class Backend_:
    """A backend whose next create calls fail as scripted; records what it was asked."""

    def __init__(self, name: Backend, takes_name: bool) -> None:
        self.name = name
        self.key_types = frozenset({KeyType.AES256_GCM})
        self.material_takes_name = takes_name
        self.failures: list[BrokerError] = []
        self.calls: list[tuple[str, datetime | None]] = []

    async def create_key(self, key: Any) -> str:
        self.calls.append(("create", None))
        if self.failures:
            raise self.failures.pop(0)
        return f"m{len(self.calls)}"

    async def finish_create(self, key: Any, since: datetime) -> str:
        self.calls.append(("finish", since))
        return "late"


def setup(*backends: Backend_) -> tuple[KeyService, Registry, list[datetime]]:
    registry, clock = Registry(), [T0]
    service = KeyService(
        registry,  # type: ignore[arg-type]
        {b.name: b for b in backends},  # type: ignore[misc]
        clock=lambda: clock[0],
        creation_lease_seconds=LEASE,
    )
    return service, registry, clock


def spec(backend: Backend, environment: str = "dev") -> NewKey:
    return NewKey(name="k", backend=backend, type=KeyType.AES256_GCM, environment=environment)


def test_a_transit_creation_with_an_unknown_outcome_keeps_its_name_and_is_finished_later() -> None:
    """504: the reservation stays; a creation within the lease is told when to come back; after it,
    the backend is asked to finish (adopt what it made since the first reservation), and the
    caller's request (here another environment) decides the key's settings."""
    transit = Backend_(Backend.VAULT, takes_name=True)
    service, registry, clock = setup(transit)
    transit.failures.append(OutcomeUnknown("vault: transit create key: no answer", backend="vault"))

    async def run() -> Key:
        with pytest.raises(OutcomeUnknown):
            await service.create(spec(Backend.VAULT), owner="app")
        assert registry.keys["k"].state is State.PRE_ACTIVE
        clock[0] = T0 + timedelta(seconds=10)
        with pytest.raises(Conflict, match=r"is being created \(started 10 s ago\).* again in 38 s"):
            await service.create(spec(Backend.VAULT), owner="app")
        clock[0] = T0 + timedelta(seconds=LEASE + 1)
        return await service.create(spec(Backend.VAULT, "staging"), owner="app")

    key = asyncio.run(run())
    assert (key.state, key.latest.material, key.environment, key.created_at) == (
        State.ACTIVE,
        "late",
        "staging",
        T0,
    )
    assert transit.calls == [("create", None), ("finish", T0)]


def test_a_kms_creation_with_an_unknown_outcome_frees_the_name_at_once() -> None:
    """KMS material is a new key id, never named like the key: nothing late can take the name,
    so it is freed and a second creation makes new material straight away."""
    kms = Backend_(Backend.KMS, takes_name=False)
    service, registry, _ = setup(kms)
    kms.failures.append(OutcomeUnknown("kms: create key: no answer", backend="kms"))

    async def run() -> Key:
        with pytest.raises(OutcomeUnknown):
            await service.create(spec(Backend.KMS), owner="app")
        assert "k" not in registry.keys
        return await service.create(spec(Backend.KMS), owner="app")

    assert asyncio.run(run()).latest.material == "m2"
    assert [c for c, _ in kms.calls] == ["create", "create"]


def test_a_name_that_cannot_be_freed_answers_the_creations_own_error() -> None:
    """The backend refused (nothing made) and Vault cannot be told to free the name: the caller
    hears the backend's error, and the reservation left behind is finished by a later creation."""
    kms = Backend_(Backend.KMS, takes_name=False)
    service, registry, clock = setup(kms)
    kms.failures.append(Unavailable("kms: throttled", backend="kms"))
    registry.delete_fails = True

    async def run() -> Key:
        with pytest.raises(Unavailable, match="kms: throttled"):
            await service.create(spec(Backend.KMS), owner="app")
        assert registry.keys["k"].state is State.PRE_ACTIVE
        clock[0] = T0 + timedelta(seconds=LEASE + 1)
        return await service.create(spec(Backend.KMS), owner="app")

    assert asyncio.run(run()).state is State.ACTIVE
    assert [c for c, _ in kms.calls] == ["create", "finish"]


def test_only_an_unfinished_creation_of_the_same_backend_and_type_is_taken_over() -> None:
    """An active key's name is taken ("already exists"); an unfinished creation on another
    backend is named, so the caller knows what to send to finish it."""
    transit = Backend_(Backend.VAULT, takes_name=True)
    kms = Backend_(Backend.KMS, takes_name=False)
    service, _, clock = setup(transit, kms)
    transit.failures.append(OutcomeUnknown("vault: no answer", backend="vault"))

    async def run() -> None:
        with pytest.raises(OutcomeUnknown):
            await service.create(spec(Backend.VAULT), owner="app")
        clock[0] = T0 + timedelta(seconds=LEASE + 1)
        with pytest.raises(Conflict, match=r"as aes256-gcm on vault did not finish"):
            await service.create(spec(Backend.KMS), owner="app")
        await service.create(spec(Backend.VAULT), owner="app")
        with pytest.raises(Conflict, match="already exists"):
            await service.create(spec(Backend.VAULT), owner="app")

    asyncio.run(run())
    assert kms.calls == []
