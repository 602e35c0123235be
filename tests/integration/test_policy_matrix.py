"""The role table, through the real HTTP API with real client certificates from the stack's PKI.

Six principals, one per shipped role, each try every operation the API serves on
keys in dev, staging and prod on all three backends; every answer must be exactly
what ARCHITECTURE.md's role table says (tests/role_table.py): the success status
when allowed, 403 when denied. ``policy explain`` must agree for every operation.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from typing import Any

import pytest

from broker.devstack.stack import DevStack
from broker.policy.model import OPERATIONS
from tests.integration.conftest import Reply, https
from tests.integration.keyops import b64, unique
from tests.integration.policyops import bind, explain, fresh, identity, put_role
from tests.role_table import BACKENDS, ENVIRONMENTS, ROLES, expected

CONTEXT = {"purpose": "matrix"}
Step = tuple[str, int, Callable[[], Reply]]


@pytest.fixture(scope="module")
def people(stack: DevStack) -> dict[str, tuple[str, str]]:
    """role → (certificate stem, principal id), each bound to that one role."""
    out = {}
    for role in ROLES:
        stem, principal = identity(stack, fresh(f"m-{role}"))
        bind(stack, principal, role)
        out[role] = (stem, principal)
    return out


def _admin(stack: DevStack, path: str, body: Any = None, *, method: str | None = None, ok: int = 200) -> Any:
    reply = https(stack, path, body=body, method=method)
    assert reply.status == ok, (path, reply.body)
    return reply.json()


def _key(stack: DevStack, backend: str, env: str, app: str, type_: str = "aes256-gcm") -> str:
    name = unique(f"mx-{backend}-{env}")
    body = {
        "name": name,
        "backend": backend,
        "type": type_,
        "environment": env,
        "deletion_protection": False,
        "tags": {"app": app},
    }
    _admin(stack, "/v1/keys", body, ok=201)
    return name


def _key_steps(stack: DevStack, who: str, app: str, backend: str, env: str) -> list[Step]:
    """Every key-scoped operation, in an order where each allowed one can succeed."""
    aes, ec = _key(stack, backend, env, app), _key(stack, backend, env, app, "ecdsa-p256")
    sealed = _admin(stack, f"/v1/keys/{aes}/encrypt", {"plaintext": b64(b"m"), "context": CONTEXT})[
        "ciphertext"
    ]
    signature = _admin(stack, f"/v1/keys/{ec}/sign", {"message": b64(b"m")})["signature"]
    grant = _admin(
        stack,
        f"/v1/keys/{aes}/grants",
        {"grantee": "cn:matrix-grantee", "operations": ["crypto.decrypt"], "expires_in": 600},
        ok=201,
    )["grant_id"]

    def call(path: str, body: Any = None, method: str | None = None) -> Callable[[], Reply]:
        return lambda: https(stack, path, who=who, body=body, method=method)

    k, s = f"/v1/keys/{aes}", f"/v1/keys/{ec}"
    new_name = unique(f"mx-new-{backend}-{env}")
    new_key = {"name": new_name, "backend": backend, "environment": env, "tags": {"app": app}}
    return [
        ("key.read", 200, call(k)),
        ("crypto.encrypt", 200, call(f"{k}/encrypt", {"plaintext": b64(b"x"), "context": CONTEXT})),
        ("crypto.decrypt", 200, call(f"{k}/decrypt", {"ciphertext": sealed, "context": CONTEXT})),
        ("crypto.datakey", 200, call(f"{k}/datakey", {"bytes": 32, "context": CONTEXT})),
        ("crypto.rewrap", 200, call(f"{k}/rewrap", {"ciphertext": sealed, "context": CONTEXT})),
        ("crypto.sign", 200, call(f"{s}/sign", {"message": b64(b"x")})),
        ("crypto.verify", 200, call(f"{s}/verify", {"message": b64(b"m"), "signature": signature})),
        ("key.update", 200, call(k, {"description": "matrix"}, "PATCH")),
        ("grant.list", 200, call(f"{k}/grants")),
        (
            "grant.create",
            201,
            call(
                f"{k}/grants", {"grantee": "cn:matrix-2", "operations": ["crypto.encrypt"], "expires_in": 60}
            ),
        ),
        ("grant.revoke", 200, call(f"{k}/grants/{grant}", method="DELETE")),
        ("key.rotate", 200, call(f"{k}/rotate", {})),
        ("key.suspend", 200, call(f"{k}/suspend", {})),
        ("key.resume", 200, call(f"{k}/resume", {})),
        ("key.revoke", 200, call(f"{k}/revoke", {"reason": "retired"})),
        ("key.schedule-destruction", 200, call(f"{k}/schedule-destruction", {"pending_days": 7})),
        ("key.cancel-destruction", 200, call(f"{k}/cancel-destruction", {})),
        ("key.create", 201, call("/v1/keys", new_key)),
    ]


def _global_steps(stack: DevStack, who: str) -> list[Step]:
    def call(path: str, body: Any = None, method: str | None = None) -> Callable[[], Reply]:
        return lambda: https(stack, path, who=who, body=body, method=method)

    scratch = {"rules": [{"operations": ["key.read"]}]}
    return [
        ("key.list", 200, call("/v1/keys?environment=dev")),
        ("policy.read", 200, call("/v1/policies")),
        ("binding.read", 200, call("/v1/bindings")),
        ("policy.write", 200, call(f"/v1/policies/{fresh('scratch')}", scratch, "PUT")),
        ("audit.read", 200, call("/v1/audit/events?limit=1")),
        ("audit.read", 200, call("/v1/audit/hmac", {"value": "acme"})),
        ("audit.verify", 200, call("/v1/audit/verify")),
        ("audit.verify", 200, call("/v1/audit/public-key")),
        ("sys.health", 200, call("/v1/sys/health")),
        ("sys.metrics", 200, call("/v1/metrics")),
        ("sys.metrics", 200, call("/metrics")),
    ]


def _run(steps: list[Step], role: str, env: str, backend: str) -> list[tuple[Any, ...]]:
    wrong = []
    for op, success, send in steps:
        allowed = expected(role, op, env)
        reply = send()
        if reply.status != (success if allowed else 403):
            wrong.append(
                (role, op, env, backend, "allowed" if allowed else "denied", reply.status, reply.body[:200])
            )
    return wrong


def test_every_role_every_operation_every_environment_every_backend(
    stack: DevStack, people: dict[str, tuple[str, str]]
) -> None:
    """6 roles x every served operation x dev/staging/prod x vault/kms/hsm: allowed or 403, exactly."""
    app_name = people["application"][1].rsplit("/", 1)[1]

    def combo(role: str, env: str, backend: str) -> list[tuple[Any, ...]]:
        return _run(_key_steps(stack, people[role][0], app_name, backend, env), role, env, backend)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda c: combo(*c), product(ROLES, ENVIRONMENTS, BACKENDS)))
        results += list(pool.map(lambda r: _run(_global_steps(stack, people[r][0]), r, "-", "-"), ROLES))

    wrong = [row for rows in results for row in rows]
    assert wrong == []


def test_explain_agrees_with_the_role_table_for_every_operation(
    stack: DevStack, people: dict[str, tuple[str, str]]
) -> None:
    """policy explain, for every role x operation x environment, names the deciding rule."""
    app_name = people["application"][1].rsplit("/", 1)[1]
    keys = {env: _key(stack, "vault", env, app_name) for env in ENVIRONMENTS}

    def ask(case: tuple[str, str, str]) -> tuple[Any, ...] | None:
        role, op, env = case
        reply = explain(stack, people[role][1], op, keys[env])
        answer = reply.json()
        want = expected(role, op, env)
        if reply.status != 200 or answer["allowed"] != want or (want and not answer["rule"]):
            return (role, op, env, want, reply.status, answer)
        return None

    with ThreadPoolExecutor(max_workers=6) as pool:
        wrong = [r for r in pool.map(ask, product(ROLES, sorted(OPERATIONS), ENVIRONMENTS)) if r]

    assert wrong == []


def test_a_denial_tells_only_what_the_caller_may_know(
    stack: DevStack, people: dict[str, tuple[str, str]]
) -> None:
    """An analyst (may read keys) hears why; an application hears the same sentence for a key it cannot
    see and a key that does not exist; a principal that may list keys gets 404 for a missing key."""
    prod = _key(stack, "vault", "prod", "someone-else")
    missing = unique("absent")
    body = {"plaintext": b64(b"x")}
    analyst = https(stack, f"/v1/keys/{prod}/encrypt", who=people["security-analyst"][0], body=body)
    app_hidden = https(stack, f"/v1/keys/{prod}/encrypt", who=people["application"][0], body=body)
    app_missing = https(stack, f"/v1/keys/{missing}/encrypt", who=people["application"][0], body=body)
    analyst_missing = https(stack, f"/v1/keys/{missing}", who=people["security-analyst"][0])

    assert analyst.status == 403
    assert analyst.json()["detail"] == (
        f"crypto.encrypt on key {prod} is denied: no rule of the roles (security-analyst) allows it"
    )
    assert (app_hidden.status, app_hidden.json()["detail"]) == (
        403,
        f"crypto.encrypt on key {prod} is denied",
    )
    assert (app_missing.status, app_missing.json()["detail"]) == (
        403,
        f"crypto.encrypt on key {missing} is denied",
    )
    assert analyst_missing.status == 404


def test_listing_shows_only_keys_the_caller_may_read(
    stack: DevStack, people: dict[str, tuple[str, str]]
) -> None:
    """A role that lists keys but reads only those tagged for it sees just those; an analyst sees all."""
    role = fresh("lister")
    put_role(
        stack,
        role,
        [
            {"operations": ["key.list"]},
            {"operations": ["key.read"], "keys": {"tags": {"app": "{principal.name}"}}},
        ],
    )
    name = fresh("lister")
    stem, principal = identity(stack, name)
    bind(stack, principal, role)
    mine, theirs = _key(stack, "kms", "dev", name), _key(stack, "kms", "dev", "other-app")

    def names(who: str) -> set[str]:
        reply = https(stack, "/v1/keys?backend=kms", who=who)
        assert reply.status == 200, reply.body
        return {k["name"] for k in reply.json()["keys"]}

    lister_sees, analyst_sees = names(stem), names(people["security-analyst"][0])

    assert (mine in lister_sees, theirs in lister_sees) == (True, False)
    assert {mine, theirs} <= analyst_sees


def test_unbound_and_unknown_principals_get_nothing(stack: DevStack) -> None:
    """A valid certificate from the broker's CA with no binding: 403 everywhere, health included."""
    stem, principal = identity(stack, fresh("nobody"))

    replies = [
        https(stack, "/v1/sys/health", who=stem),
        https(stack, "/v1/keys", who=stem),
        https(stack, "/v1/policies", who=stem),
        https(
            stack,
            f"/v1/keys/{unique('x')}/encrypt",
            who=stem,
            body={"plaintext": base64.b64encode(b"x").decode()},
        ),
    ]

    assert [r.status for r in replies] == [403, 403, 403, 403]
    assert replies[0].json()["detail"] == f"sys.health is denied: {principal} is bound to no role"
