"""A key the broker creates is material the broker made: it never adopts a backend key by name."""

from __future__ import annotations

from broker.devstack.stack import DevStack
from broker.vaultops.policy import Mounts
from tests.integration.conftest import https
from tests.integration.keyops import unique


def test_creating_a_vault_key_refuses_a_transit_key_someone_else_made(stack: DevStack) -> None:
    """Name squatting: a transit key made outside the broker (exportable, 128-bit, plaintext
    backup allowed) under the name of a key to be created is refused with 409, not rotated and
    used; the broker's registry keeps no entry for it and the squatted key is left untouched."""
    name = unique("t-squat")
    transit = f"/v1/{Mounts().transit}/keys/{name}"
    vault = stack.vault_client()
    squat = {"type": "aes128-gcm96", "exportable": True, "allow_plaintext_backup": True}
    vault.adapter.post(transit, json=squat)

    reply = https(stack, "/v1/keys", body={"name": name, "backend": "vault", "environment": "prod"})
    after = https(stack, f"/v1/keys/{name}")
    squatted = vault.adapter.get(transit)["data"]

    assert (reply.status, reply.json()["code"]) == (409, "conflict")
    assert "did not create" in reply.json()["detail"]
    assert after.status == 404
    assert (squatted["type"], squatted["latest_version"]) == ("aes128-gcm96", 1)


def test_a_vault_key_the_broker_creates_is_its_own_first_version(stack: DevStack) -> None:
    """The control: a fresh name gets a non-exportable aes256-gcm96 transit key at version 1."""
    name = unique("t-fresh")

    reply = https(stack, "/v1/keys", body={"name": name, "backend": "vault", "environment": "prod"})
    made = stack.vault_client().adapter.get(f"/v1/{Mounts().transit}/keys/{name}")["data"]

    assert reply.status == 201, reply.body
    assert (made["type"], made["exportable"], made["allow_plaintext_backup"], made["latest_version"]) == (
        "aes256-gcm96",
        False,
        False,
        1,
    )
