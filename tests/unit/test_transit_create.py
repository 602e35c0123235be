"""Transit key creation never adopts a key it did not make, even one created in a race."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from broker.backends.base import KeyRef
from broker.backends.vault import VaultClient
from broker.backends.vault.transit import VaultTransit
from broker.errors import Conflict, NotFound
from broker.vocab import KeyType

MADE = {"type": "aes256-gcm96", "exportable": False, "allow_plaintext_backup": False, "latest_version": 1}


class ScriptedVault:
    """Answers transit's key reads and the create with what a racing creator would leave."""

    def __init__(self, created: dict[str, Any], read_back: dict[str, Any]) -> None:
        self.created = created
        self.read_back = read_back
        self.reads = 0

    async def request(self, method: str, path: str, body: Any = None, *, what: str) -> dict[str, Any]:
        if method == "POST":
            return self.created
        self.reads += 1
        if self.reads == 1:
            raise NotFound("vault: transit read key: not found")
        return {"data": self.read_back}


def create(vault: ScriptedVault) -> str:
    transit = VaultTransit(cast(VaultClient, vault), "kb-transit", coalesce=False)
    return asyncio.run(transit.create_key(KeyRef("payments", KeyType.AES256_GCM)))


@pytest.mark.parametrize(
    ("created", "read_back"),
    [
        ({"warnings": ["key payments already existed"]}, MADE),
        ({}, {**MADE, "exportable": True}),
        ({}, {**MADE, "type": "aes128-gcm96"}),
        ({}, {**MADE, "allow_plaintext_backup": True}),
        ({}, {**MADE, "latest_version": 3}),
    ],
    ids=["upsert-warned", "exportable", "weaker-type", "backup-allowed", "not-first-version"],
)
def test_a_key_made_by_someone_else_between_check_and_create_is_refused(
    created: dict[str, Any], read_back: dict[str, Any]
) -> None:
    """Transit's create is an upsert: a key that appeared after the existence check is caught by its
    warning or by reading back what exists, and refused rather than used."""
    with pytest.raises(Conflict, match="did not create"):
        create(ScriptedVault(created, read_back))


def test_the_broker_s_own_new_key_is_version_one() -> None:
    """The control: what the broker asked for, at version 1, is accepted."""
    assert create(ScriptedVault({}, MADE)) == "1"
