"""Context conditions, grants and policy changes, enforced by the real broker on every backend."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from broker.devstack.stack import DevStack
from tests.integration.conftest import Reply, https
from tests.integration.keyops import b64, create_key, unb64
from tests.integration.policyops import bind, fresh, identity, put_role

BACKENDS = ["vault", "kms", "hsm"]


@pytest.fixture(scope="module")
def tenants(stack: DevStack) -> dict[str, str]:
    """Two applications bound to a role whose context must say tenant = {principal.name}."""
    role = fresh("tenant-app")
    put_role(
        stack,
        role,
        [
            {
                "operations": ["crypto.encrypt", "crypto.decrypt", "crypto.datakey"],
                "context": {"equals": {"tenant": "{principal.name}"}},
            }
        ],
    )
    out = {}
    for tenant in ("acme", "globex"):
        stem, principal = identity(stack, fresh(tenant), kind="app")
        bind(stack, principal, role)
        out[tenant] = stem
    return out


def _name(stem: str) -> str:
    return stem.split("-", 2)[2]  # id-app-<name>


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_application_touches_only_its_own_tenants_data(
    stack: DevStack, tenants: dict[str, str], backend: str
) -> None:
    """acme uses tenant=acme; 403 for tenant=globex, for no context, and for globex on acme's context."""
    key = create_key(stack, backend)
    acme, globex = tenants["acme"], tenants["globex"]
    own = {"tenant": _name(acme)}
    other = {"tenant": _name(globex)}

    sealed = https(
        stack, f"/v1/keys/{key}/encrypt", who=acme, body={"plaintext": b64(b"acme row"), "context": own}
    )
    opened = https(
        stack,
        f"/v1/keys/{key}/decrypt",
        who=acme,
        body={"ciphertext": sealed.json()["ciphertext"], "context": own},
    )
    as_other = https(
        stack, f"/v1/keys/{key}/encrypt", who=acme, body={"plaintext": b64(b"x"), "context": other}
    )
    no_context = https(stack, f"/v1/keys/{key}/datakey", who=acme, body={})
    stolen = https(
        stack,
        f"/v1/keys/{key}/decrypt",
        who=globex,
        body={"ciphertext": sealed.json()["ciphertext"], "context": own},
    )
    batch = https(
        stack,
        f"/v1/keys/{key}/encrypt",
        who=acme,
        body={
            "batch": [{"plaintext": b64(b"a"), "context": own}, {"plaintext": b64(b"b"), "context": other}]
        },
    )

    assert (sealed.status, opened.status) == (200, 200)
    assert unb64(opened.json()["plaintext"]) == b"acme row"
    assert [as_other.status, no_context.status, stolen.status] == [403, 403, 403]
    items = batch.json()["batch"]
    assert ("ciphertext" in items[0], items[1]["error"]["status"]) == (True, 403)


def _grant(stack: DevStack, key: str, body: dict[str, object], who: str = "admin") -> Reply:
    return https(stack, f"/v1/keys/{key}/grants", who=who, body=body)


def _encrypt(stack: DevStack, key: str, who: str, context: dict[str, str] | None = None) -> int:
    return https(
        stack, f"/v1/keys/{key}/encrypt", who=who, body={"plaintext": b64(b"g"), "context": context or {}}
    ).status


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grant_works_until_it_expires_and_not_a_second_longer(stack: DevStack, backend: str) -> None:
    """An unbound principal: 403; granted for 3s: 200; one second after expiry: 403 again."""
    key = create_key(stack, backend)
    stem, principal = identity(stack, fresh("grantee"))
    before = _encrypt(stack, key, stem)

    reply = _grant(stack, key, {"grantee": principal, "operations": ["crypto.encrypt"], "expires_in": 3})
    during = _encrypt(stack, key, stem)
    expires = datetime.fromisoformat(reply.json()["expires_at"].replace("Z", "+00:00"))
    time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 1)
    after = _encrypt(stack, key, stem)

    assert reply.status == 201
    assert reply.json()["grant_token"] == f"kbg1.{key}.{reply.json()['grant_id']}"
    assert [before, during, after] == [403, 200, 403]


def test_a_context_bound_grant_refuses_other_contexts(stack: DevStack) -> None:
    """context_equals is exact; context_subset lets more fields through but not other values."""
    key = create_key(stack, "vault")
    exact_stem, exact = identity(stack, fresh("exact"))
    subset_stem, subset = identity(stack, fresh("subset"))
    ops = {"operations": ["crypto.encrypt"], "expires_in": 600}
    _grant(stack, key, {"grantee": exact, "context_equals": {"tenant": "acme"}, **ops})
    _grant(stack, key, {"grantee": subset, "context_subset": {"tenant": "acme"}, **ops})

    got = [
        _encrypt(stack, key, exact_stem, {"tenant": "acme"}),
        _encrypt(stack, key, exact_stem, {"tenant": "acme", "extra": "1"}),
        _encrypt(stack, key, exact_stem, {"tenant": "globex"}),
        _encrypt(stack, key, subset_stem, {"tenant": "acme", "extra": "1"}),
        _encrypt(stack, key, subset_stem, {"tenant": "globex"}),
    ]

    assert got == [200, 403, 403, 200, 403]


def test_revoke_and_retire_take_effect_at_once(stack: DevStack) -> None:
    """A custodian's revoke and a grantee's retire end the grant for the very next request;
    nobody but the grantee may retire it."""
    key = create_key(stack, "hsm")
    stem, principal = identity(stack, fresh("grantee"))
    body = {"grantee": principal, "operations": ["crypto.encrypt"], "expires_in": 600}
    first = _grant(stack, key, body).json()
    works = _encrypt(stack, key, stem)
    revoked = https(stack, f"/v1/keys/{key}/grants/{first['grant_id']}", method="DELETE")
    after_revoke = _encrypt(stack, key, stem)
    second = _grant(stack, key, body).json()
    by_other = https(stack, f"/v1/keys/{key}/grants/{second['grant_id']}/retire", body={})
    works_again = _encrypt(stack, key, stem)
    retired = https(stack, f"/v1/keys/{key}/grants/{second['grant_id']}/retire", who=stem, body={})
    after_retire = _encrypt(stack, key, stem)
    listed = https(stack, f"/v1/keys/{key}/grants").json()["grants"]

    assert [works, revoked.status, after_revoke] == [200, 200, 403]
    assert [by_other.status, works_again, retired.status, after_retire] == [403, 200, 200, 403]
    assert listed == []


def test_a_grant_cannot_give_more_than_the_granter_holds(stack: DevStack) -> None:
    """A lead who may grant on dev and prod keys but use only dev keys cannot hand out prod use;
    expires_in beyond the policy's cap and non-grantable operations are refused."""
    role = fresh("lead")
    put_role(
        stack,
        role,
        [
            {"operations": ["grant.create", "key.read"]},
            {"operations": ["crypto.*"], "keys": {"environment": ["dev"]}},
        ],
    )
    lead_stem, lead = identity(stack, fresh("lead"))
    bind(stack, lead, role)
    dev = create_key(stack, "kms")
    prod = create_key(stack, "kms", environment="prod")
    body = {"grantee": "cn:helper", "operations": ["crypto.decrypt"], "expires_in": 600}

    on_dev = _grant(stack, dev, body, who=lead_stem)
    on_prod = _grant(stack, prod, body, who=lead_stem)
    too_long = _grant(stack, dev, {**body, "expires_in": "30d"}, who=lead_stem)
    manage = _grant(stack, dev, {**body, "operations": ["key.rotate"]}, who=lead_stem)

    assert on_dev.status == 201
    assert on_prod.status == 403
    assert on_prod.json()["detail"] == (
        f"a grant cannot give more than its granter holds: you may not crypto.decrypt on key {prod}"
    )
    assert (too_long.status, manage.status) == (400, 400)


def test_a_change_through_one_replica_is_enforced_by_the_other_within_the_refresh_interval(
    stack: DevStack, second_broker: str
) -> None:
    """Take encrypt away through replica 1; replica 2 refuses within 2 s (+ one request's slack)."""
    refresh = 2.0
    key = create_key(stack, "vault")
    role = fresh("shifting")
    put_role(stack, role, [{"operations": ["crypto.encrypt"]}])
    stem, principal = identity(stack, fresh("shifty"))
    bind(stack, principal, role)

    def on_replica() -> int:
        return https(
            stack, f"/v1/keys/{key}/encrypt", who=stem, url=second_broker, body={"plaintext": b64(b"r")}
        ).status

    deadline = time.monotonic() + 3 * refresh
    while on_replica() != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    allowed_before = on_replica()
    put_role(stack, role, [{"operations": ["key.read"]}])
    changed = time.monotonic()
    while on_replica() != 403 and time.monotonic() < changed + 3 * refresh:
        time.sleep(0.1)
    took = time.monotonic() - changed

    assert allowed_before == 200
    assert on_replica() == 403
    assert took <= refresh + 1.0


def test_expired_grants_are_purged_from_vault(stack: DevStack) -> None:
    """The purge (which the scheduler runs) removes exactly the expired grants from Vault KV."""
    import asyncio
    from datetime import timedelta

    from broker.backends.vault import VaultClient
    from broker.config.load import load_config
    from broker.policy.model import Grant
    from broker.state.grants import GrantStore, new_grant_id

    key = create_key(stack, "vault")
    now = [datetime.now(UTC)]

    def grant(seconds: int) -> Grant:
        return Grant(
            new_grant_id(),
            key,
            "cn:p",
            ("crypto.decrypt",),
            now[0],
            now[0] + timedelta(seconds=seconds),
            "cn:a",
        )

    async def scenario() -> tuple[int, list[str]]:
        vault = VaultClient(load_config(stack.layout.broker_config).vault)
        await vault.start()
        try:
            store = GrantStore(vault, "kb-kv", clock=lambda: now[0])
            short, long = grant(60), grant(3600)
            await store.add(short)
            await store.add(long)
            now[0] += timedelta(seconds=61)
            purged = await store.purge_expired()
            return purged, [long.id]
        finally:
            await vault.close()

    purged, kept = asyncio.run(scenario())
    stored = stack.vault_client().secrets.kv.v2.read_secret_version(
        path=f"grants/{key}", mount_point="kb-kv", raise_on_deleted_version=True
    )

    assert purged >= 1
    assert [g["id"] for g in stored["data"]["data"]["grants"]] == kept


def test_an_invalid_stored_policy_leaves_only_break_glass_who_repair_it(stack: DevStack) -> None:
    """Someone writes garbage into Vault around the broker: everyone is refused except the config's
    break-glass administrator, who stores a valid document again; service is back at once."""
    good = https(stack, "/v1/policies").json()["document"]
    key = create_key(stack, "vault", tags={"app": "app"})
    stack.vault_client().secrets.kv.v2.create_or_update_secret(
        path="policy/document",
        secret={"roles": {"x": {"rules": [{"operations": ["nope"]}]}}},
        mount_point="kb-kv",
    )
    deadline = time.monotonic() + 10
    health = https(stack, "/v1/sys/health")
    while health.status == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        health = https(stack, "/v1/sys/health")
    refused = https(stack, f"/v1/keys/{key}/encrypt", who="app", body={"plaintext": b64(b"g"), "context": {}})
    repaired = https(stack, "/v1/policies", method="PUT", body={"document": good})
    restored = _encrypt(stack, key, "app")

    assert health.status == 503
    assert "stored document is invalid" in health.json()["policy"]["error"]
    assert (refused.status, refused.json()["code"]) == (503, "policy_invalid")
    assert repaired.status == 200, repaired.body
    assert restored == 200
