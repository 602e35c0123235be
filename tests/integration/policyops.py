"""Helpers for policy tests on the running stack: identities with real certificates, bindings, roles."""

from __future__ import annotations

import time
import uuid
from typing import Any

from broker.devstack.stack import DevStack
from tests.integration.conftest import Reply, https


def identity(stack: DevStack, name: str, kind: str = "user") -> tuple[str, str]:
    """Issue a client certificate from the stack's Vault PKI; return (stem for ``who=``, principal id)."""
    stem = f"id-{kind}-{name}"
    principal = stack.issue_client_certificate(stem, name, kind)
    return stem, principal


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def bind(stack: DevStack, principal: str, *roles: str) -> None:
    """Set one principal's roles (read, change, write check-and-set; retried on a concurrent change)."""
    for _ in range(20):
        current = https(stack, "/v1/bindings").json()
        bindings = {**current["bindings"], principal: list(roles)}
        reply = https(
            stack, "/v1/bindings", method="PUT", body={"bindings": bindings, "version": current["version"]}
        )
        if reply.status == 200:
            return
        assert reply.status == 409, reply.body
        time.sleep(0.05)
    raise AssertionError("could not bind: the policy document kept changing")


def put_role(stack: DevStack, role: str, rules: list[dict[str, Any]], *, url: str | None = None) -> Reply:
    reply = https(stack, f"/v1/policies/{role}", method="PUT", body={"rules": rules}, url=url)
    assert reply.status == 200, reply.body
    return reply


def explain(stack: DevStack, principal: str, operation: str, key: str | None = None, **kw: Any) -> Reply:
    body: dict[str, Any] = {"principal": principal, "operation": operation, **kw}
    if key is not None:
        body["key"] = key
    return https(stack, "/v1/policies/explain", body=body)
