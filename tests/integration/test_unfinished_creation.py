"""A vault key whose creation timed out after Vault took it (504 ``outcome_unknown``), on the real stack.

What that leaves is built here as Vault leaves it: the broker's reservation in the registry
(pre-active, no version, older than the creation lease) and the transit key Vault made late,
with the settings the broker asked for. Creating the key again finishes the creation with that
transit key; a transit key that predates the reservation, or has other settings, is still
refused as squatted (the reservation then goes, as after any refused creation), and left untouched.
"""

from __future__ import annotations

from datetime import timedelta

import hvac.exceptions
import pytest

from broker.devstack.stack import DevStack
from broker.keys.model import Key, State
from broker.timeutil import now_utc
from broker.vaultops.policy import Mounts
from broker.vocab import Backend, KeyType
from tests.integration.conftest import https
from tests.integration.keyops import b64, unique

AS_THE_BROKER_ASKS = {"type": "aes256-gcm96", "exportable": False, "allow_plaintext_backup": False}


def leave_unfinished(
    stack: DevStack,
    name: str,
    *,
    reserved_ago: float,
    claims_made_ago: float,
    type_: KeyType = KeyType.AES256_GCM,
) -> None:
    """The registry entry a creation writes before its backend call, as a lost creation leaves it:
    last touched ``reserved_ago`` seconds ago, first made ``claims_made_ago`` seconds ago."""
    now = now_utc()
    key = Key(
        name=name,
        backend=Backend.VAULT,
        type=type_,
        environment="dev",
        state=State.PRE_ACTIVE,
        created_at=now - timedelta(seconds=claims_made_ago),
        updated_at=now - timedelta(seconds=reserved_ago),
        owner="spiffe://keybroker.test/app/someone",
    )
    stack.vault_client().secrets.kv.v2.create_or_update_secret(
        path=f"keys/{name}", secret=key.to_json(), cas=0, mount_point=Mounts().kv
    )


def transit_key(stack: DevStack, name: str) -> dict[str, object]:
    data: dict[str, object] = stack.vault_client().adapter.get(f"/v1/{Mounts().transit}/keys/{name}")["data"]
    return data


def test_a_transit_key_vault_made_late_is_adopted_when_the_key_is_created_again(stack: DevStack) -> None:
    """Reserved 5 minutes ago, transit key made now (late): the new creation answers 201 with
    version 1 = that transit key, and the key encrypts and decrypts."""
    name = unique("t-late")
    leave_unfinished(stack, name, reserved_ago=300, claims_made_ago=300)
    stack.vault_client().adapter.post(f"/v1/{Mounts().transit}/keys/{name}", json=AS_THE_BROKER_ASKS)

    created = https(stack, "/v1/keys", body={"name": name, "backend": "vault", "environment": "dev"})
    assert created.status == 201, created.body
    assert (created.json()["state"], created.json()["latest_version"]) == ("active", 1)
    sealed = https(stack, f"/v1/keys/{name}/encrypt", body={"plaintext": b64(b"late but ours")})
    opened = https(stack, f"/v1/keys/{name}/decrypt", body={"ciphertext": sealed.json()["ciphertext"]})
    assert opened.json()["plaintext"] == b64(b"late but ours")
    assert transit_key(stack, name)["latest_version"] == 1


def test_a_late_signing_key_is_adopted_too(stack: DevStack) -> None:
    """Transit tells an asymmetric key's version time as an RFC 3339 string with nanoseconds
    (a symmetric one's as a Unix time): both are read."""
    name = unique("t-late-sig")
    leave_unfinished(stack, name, reserved_ago=300, claims_made_ago=300, type_=KeyType.ECDSA_P256)
    stack.vault_client().adapter.post(
        f"/v1/{Mounts().transit}/keys/{name}", json={**AS_THE_BROKER_ASKS, "type": "ecdsa-p256"}
    )

    body = {"name": name, "backend": "vault", "environment": "dev", "type": "ecdsa-p256"}
    created = https(stack, "/v1/keys", body=body)
    assert created.status == 201, created.body
    signed = https(stack, f"/v1/keys/{name}/sign", body={"message": b64(b"late")})
    assert signed.status == 200, signed.body


def test_an_unfinished_creation_with_no_transit_key_yet_is_made_now(stack: DevStack) -> None:
    """Vault never did it: the new creation makes the transit key itself."""
    name = unique("t-never")
    leave_unfinished(stack, name, reserved_ago=300, claims_made_ago=300)

    created = https(stack, "/v1/keys", body={"name": name, "backend": "vault", "environment": "dev"})

    assert created.status == 201, created.body
    made = transit_key(stack, name)
    assert (made["type"], made["exportable"], made["latest_version"]) == ("aes256-gcm96", False, 1)


def test_a_transit_key_older_than_the_reservation_or_with_other_settings_is_not_adopted(
    stack: DevStack,
) -> None:
    """Squatting is still refused through an unfinished creation: a transit key made before the
    reservation (its version 1 predates it by more than the clock slack) and an exportable one."""
    older = unique("t-before")
    stack.vault_client().adapter.post(f"/v1/{Mounts().transit}/keys/{older}", json=AS_THE_BROKER_ASKS)
    leave_unfinished(stack, older, reserved_ago=300, claims_made_ago=-600)  # reserved after the key
    exportable = unique("t-export")
    leave_unfinished(stack, exportable, reserved_ago=300, claims_made_ago=300)
    stack.vault_client().adapter.post(
        f"/v1/{Mounts().transit}/keys/{exportable}", json={**AS_THE_BROKER_ASKS, "exportable": True}
    )

    for name in (older, exportable):
        refused = https(stack, "/v1/keys", body={"name": name, "backend": "vault", "environment": "dev"})
        assert (refused.status, refused.json()["code"]) == (409, "conflict"), refused.body
        assert "did not create" in refused.json()["detail"]
        # As for any squatted name: no key is registered, and the name stays refused.
        assert https(stack, f"/v1/keys/{name}").status == 404
    assert transit_key(stack, exportable)["exportable"] is True


def test_a_creation_still_within_its_lease_is_not_taken_over(stack: DevStack) -> None:
    """A reservation touched 5 s ago may be a creation still running on another replica: 409 that
    says when a new creation may finish it, and nothing is made meanwhile."""
    name = unique("t-young")
    leave_unfinished(stack, name, reserved_ago=5, claims_made_ago=5)

    refused = https(stack, "/v1/keys", body={"name": name, "backend": "vault", "environment": "dev"})

    assert refused.status == 409, refused.body
    assert "is being created" in refused.json()["detail"], refused.body
    shown = https(stack, f"/v1/keys/{name}").json()
    assert (shown["state"], shown["latest_version"]) == ("pre-active", None), shown
    with pytest.raises(hvac.exceptions.InvalidPath):
        transit_key(stack, name)
