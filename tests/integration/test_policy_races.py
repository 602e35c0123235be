"""Policy writes across replicas, grants against their granter, break-glass and templated globs,
all on the real stack (OpenBao, the broker processes and their certificates)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from broker.devstack.stack import DevStack
from broker.vaultops.policy import Mounts
from tests.integration.conftest import extra_broker, https
from tests.integration.keyops import b64, create_key
from tests.integration.policyops import bind, fresh, identity, put_role

KV = "kb-kv"


def stored_document(stack: DevStack) -> tuple[dict[str, Any], int]:
    """The policy document exactly as Vault holds it (not as any broker has cached it)."""
    out = stack.vault_client().secrets.kv.v2.read_secret_version(
        path="policy/document", mount_point=KV, raise_on_deleted_version=True
    )
    return out["data"]["data"], int(out["data"]["metadata"]["version"])


def unbind(stack: DevStack, principal: str) -> None:
    """Remove one principal's binding through the stack's broker (check-and-set on what it read)."""
    current = https(stack, "/v1/bindings").json()
    bindings = {p: r for p, r in current["bindings"].items() if p != principal}
    reply = https(
        stack, "/v1/bindings", method="PUT", body={"bindings": bindings, "version": current["version"]}
    )
    assert reply.status == 200, reply.body


@pytest.fixture
def stale_replica(stack: DevStack, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Starts a second broker that re-reads the policy only once a minute: its cache is what the
    document was when it started, for the rest of the test."""
    with ExitStack() as brokers:

        def start() -> str:
            stale = extra_broker(
                stack,
                tmp_path,
                "broker-stale",
                extra_config="\n[policy]\nrefresh_seconds = 60\nmax_stale_seconds = 600\n",
            )
            return brokers.enter_context(stale).url

        yield start


def test_a_binding_removed_through_one_replica_stays_removed_when_a_stale_replica_writes(
    stack: DevStack, stale_replica: Callable[[], str]
) -> None:
    """B removes a binding; A (whose cache still has it) then stores a roles-only document and a
    bindings change: the binding stays removed, B's role change survives, and a stale version is 409."""
    _, gone = identity(stack, fresh("removed"))
    _, added = identity(stack, fresh("added"))
    role = fresh("race-role")
    put_role(stack, role, [{"operations": ["key.read"]}])
    bind(stack, gone, role)
    replica_a = stale_replica()  # reads the document now (binding present) and keeps that copy

    unbind(stack, gone)  # through B (the stack's broker)
    put_role(stack, role, [{"operations": ["key.read", "key.list"]}])
    document, version = stored_document(stack)
    assert gone not in document["bindings"]

    roles_only = {k: v for k, v in document.items() if k != "bindings"}
    roles_only["roles"] = {**roles_only["roles"], fresh("extra"): {"rules": [{"operations": ["key.read"]}]}}
    via_a = https(
        stack, "/v1/policies", method="PUT", url=replica_a, body={"document": roles_only, "version": version}
    )
    after_policy, version2 = stored_document(stack)
    bindings = {**after_policy["bindings"], added: [role]}
    bound_via_a = https(
        stack, "/v1/bindings", method="PUT", url=replica_a, body={"bindings": bindings, "version": version2}
    )
    after_bindings, version3 = stored_document(stack)
    stale = https(
        stack, "/v1/bindings", method="PUT", url=replica_a, body={"bindings": bindings, "version": version}
    )
    read_via_a = https(stack, "/v1/bindings", url=replica_a).json()

    assert via_a.status == 200, via_a.body
    assert gone not in after_policy["bindings"]
    assert bound_via_a.status == 200, bound_via_a.body
    assert gone not in after_bindings["bindings"]
    assert after_bindings["bindings"][added] == [role]
    assert after_bindings["roles"][role]["rules"] == [{"operations": ["key.read", "key.list"]}]
    assert (stale.status, stale.json()["code"]) == (409, "conflict")
    assert stored_document(stack)[1] == version3
    assert (read_via_a["version"], gone in read_via_a["bindings"]) == (version3, False)
    unbind(stack, added)


def test_a_grant_never_gives_what_its_granter_is_denied_for_that_exact_context(stack: DevStack) -> None:
    """The granter is denied encrypt with class=secret; its grant with context_subset {t: a} lets the
    grantee send {t: a} but not {t: a, class: secret} — nor anything once the granter loses its role."""
    key = create_key(stack, "vault")
    granter_stem, granter = identity(stack, fresh("granter"))
    grantee_stem, grantee = identity(stack, fresh("grantee"), kind="app")
    role = fresh("owner")
    put_role(
        stack,
        role,
        [
            {"operations": ["crypto.encrypt", "grant.create", "key.read"], "keys": {"name": key}},
            {
                "id": f"{role}-no-secret",
                "effect": "deny",
                "operations": ["crypto.encrypt"],
                "context": {"equals": {"class": "secret"}},
            },
        ],
    )
    bind(stack, granter, role)

    def encrypt(who: str, context: dict[str, str]) -> int:
        body = {"plaintext": b64(b"x"), "context": context}
        return https(stack, f"/v1/keys/{key}/encrypt", who=who, body=body).status

    created = https(
        stack,
        f"/v1/keys/{key}/grants",
        who=granter_stem,
        body={
            "grantee": grantee,
            "operations": ["crypto.encrypt"],
            "context_subset": {"t": "a"},
            "expires_in": "10m",
        },
    )
    granter_secret = encrypt(granter_stem, {"t": "a", "class": "secret"})
    plain = encrypt(grantee_stem, {"t": "a"})
    secret = encrypt(grantee_stem, {"t": "a", "class": "secret"})
    public = encrypt(grantee_stem, {"t": "a", "class": "public"})
    explained = https(
        stack,
        "/v1/policies/explain",
        body={
            "principal": grantee,
            "operation": "crypto.encrypt",
            "key": key,
            "context": {"t": "a", "class": "secret"},
        },
    ).json()
    unbind(stack, granter)  # the granter loses its role: its grant gives nothing any more
    after_unbind = encrypt(grantee_stem, {"t": "a"})

    assert created.status == 201, created.body
    assert granter_secret == 403
    assert [plain, secret, public] == [200, 403, 200]
    assert explained["allowed"] is False
    assert f"its granter {granter} may not make this request itself now" in " ".join(explained["near_misses"])
    assert after_unbind == 403


@pytest.fixture
def restore_policy(stack: DevStack) -> Iterator[dict[str, Any]]:
    """Put the document back through Vault itself afterwards (works even if the broker locked us out)."""
    document, _ = stored_document(stack)
    yield document
    stack.vault_client().secrets.kv.v2.create_or_update_secret(
        path="policy/document", secret=document, mount_point=KV
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = https(stack, "/v1/sys/health")
        if health.status == 200 and health.json()["policy"]["version"] == stored_document(stack)[1]:
            return
        time.sleep(0.2)
    raise AssertionError("the broker did not pick the restored policy up")


def test_a_stored_deny_role_bound_by_a_glob_does_not_lock_out_break_glass(
    stack: DevStack, restore_policy: dict[str, Any]
) -> None:
    """A deny-everything role bound to spiffe://…/user/adm* denies other principals it covers, but
    the config's break-glass administrator (user/admin) still acts and can remove the binding."""
    role = fresh("lockdown")
    put_role(stack, role, [{"effect": "deny", "operations": ["*"]}])
    glob = "spiffe://keybroker.dev/user/adm*"
    bind(stack, glob, role)

    key = https(
        stack,
        "/v1/keys",
        body={"name": fresh("bg"), "backend": "vault", "type": "aes256-gcm", "environment": "dev"},
    )
    read = https(stack, "/v1/policies")
    mine = https(stack, "/v1/policies/explain", body={"principal": "spiffe://keybroker.dev/user/admin",
                                                      "operation": "policy.write"})  # fmt: skip
    theirs = https(stack, "/v1/policies/explain", body={"principal": "spiffe://keybroker.dev/user/admiral",
                                                        "operation": "policy.write"})  # fmt: skip
    current = https(stack, "/v1/bindings").json()
    unbound = https(
        stack,
        "/v1/bindings",
        method="PUT",
        body={
            "bindings": {p: r for p, r in current["bindings"].items() if p != glob},
            "version": current["version"],
        },
    )

    assert key.status == 201, key.body
    assert read.status == 200
    assert (mine.json()["allowed"], mine.json()["rule"]) == (True, "config:administrators")
    assert (theirs.json()["allowed"], theirs.json()["rule"]) == (False, f"{role}[0]")
    assert unbound.status == 200, unbound.body


def _issue_cn_only(stack: DevStack, stem: str, common_name: str) -> None:
    """A client certificate with only a CN (no SPIFFE URI), from a test PKI role that allows any name.

    The stack's own client role is meant to be narrow; the broker trusts the CA, not the role, so a
    careless or compromised issuer is exactly what this stands for.
    """
    pki = Mounts().pki
    client = stack.vault_client()
    client.adapter.post(
        f"/v1/{pki}/roles/test-any-cn",
        json={
            "allow_any_name": True,
            "enforce_hostnames": False,
            "allow_wildcard_certificates": True,
            "allow_glob_domains": True,
            "server_flag": False,
            "client_flag": True,
            "key_type": "ec",
            "key_bits": 256,
            "ttl": "1h",
        },
    )
    data = client.adapter.post(
        f"/v1/{pki}/issue/test-any-cn", json={"common_name": common_name, "ttl": "1h"}
    )["data"]
    tls = stack.layout.tls
    (tls / f"{stem}.key").write_text(data["private_key"].strip() + "\n")
    (tls / f"{stem}.crt").write_text(
        data["certificate"].strip() + "\n" + "\n".join(c.strip() for c in data["ca_chain"]) + "\n"
    )


def test_a_certificate_named_with_glob_characters_reaches_only_its_literal_keys(stack: DevStack) -> None:
    """A rule keys.name "{principal.name}-*": a CN "*" must not match every key (nor "[p]*" the p… ones);
    a SPIFFE principal with an ordinary name still gets its own keys through the same rule."""
    role = fresh("own-keys")
    put_role(stack, role, [{"operations": ["crypto.encrypt"], "keys": {"name": ["{principal.name}-*"]}}])
    name = fresh("tn")
    own_stem, own = identity(stack, name, kind="app")
    bind(stack, own, role)
    spec = {"backend": "vault", "type": "aes256-gcm", "environment": "dev"}
    own_key = https(stack, "/v1/keys", body={"name": f"{name}-k", **spec})
    other_key = https(stack, "/v1/keys", body={"name": fresh("pay"), **spec})
    assert (own_key.status, other_key.status) == (201, 201), (own_key.body, other_key.body)
    statuses = {}
    bound = []
    try:
        for cn in ("*", "[p]*", "?*"):
            stem = f"id-cn-{fresh('glob')}"
            _issue_cn_only(stack, stem, cn)
            bound.append("cn:" + cn.replace("[", "[[]").replace("*", "[*]").replace("?", "[?]"))
            bind(stack, bound[-1], role)
            for target in (other_key.json()["name"], own_key.json()["name"]):
                body = {"plaintext": b64(b"x"), "context": {}}
                reply = https(stack, f"/v1/keys/{target}/encrypt", who=stem, body=body)
                statuses[(cn, target)] = reply.status
    finally:
        # These bindings name CNs other tests' certificates may carry (cn:* above all): leave none.
        for principal in bound:
            unbind(stack, principal)
    body = {"plaintext": b64(b"x"), "context": {}}
    mine = https(stack, f"/v1/keys/{own_key.json()['name']}/encrypt", who=own_stem, body=body).status

    assert mine == 200
    # 403 from the policy; 401 would mean the broker refuses such a certificate outright (also fine).
    assert set(statuses.values()) <= {401, 403}, statuses
    assert 200 not in statuses.values()


def test_a_granter_unbound_through_one_replica_cannot_mint_a_grant_through_a_stale_one(
    stack: DevStack, stale_replica: Callable[[], str]
) -> None:
    """Creating a grant decides "not more than the granter holds" on the document in Vault, not on a
    replica's cache: a granter whose role B just removed gets 403 from A, whose cache still binds it."""
    key = create_key(stack, "vault")
    granter_stem, granter = identity(stack, fresh("granter"))
    _, grantee = identity(stack, fresh("grantee"), kind="app")
    role = fresh("granting")
    put_role(
        stack, role, [{"operations": ["crypto.encrypt", "grant.create", "key.read"], "keys": {"name": key}}]
    )
    bind(stack, granter, role)
    replica_a = stale_replica()
    unbind(stack, granter)

    body = {"grantee": grantee, "operations": ["crypto.encrypt"], "expires_in": "10m"}
    via_a = https(stack, f"/v1/keys/{key}/grants", who=granter_stem, url=replica_a, body=body)
    grants = https(stack, f"/v1/keys/{key}/grants").json()["grants"]

    assert via_a.status == 403, via_a.body
    assert "a grant cannot give more than its granter holds" in via_a.json()["detail"]
    assert grants == []
