"""One audit record per request: who, what, on which key, the decision, the outcome, the evidence.

Context values are HMAC'd with a key the broker holds and the log does not (as
Vault's audit device does), so an auditor can check whether a record used a given
value (``POST /v1/audit/hmac``) without the log revealing it. Plaintext, key
material, data keys and tokens never reach a record: nothing here reads a body.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.policy.model import Decision


def hmac_value(key: bytes, value: str) -> str:
    """``surrogatepass``: a str that is not valid Unicode still gets its own HMAC, never an exception."""
    return "hmac-sha256:" + hmac.new(key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def hmac_context(key: bytes, context: Mapping[str, str]) -> dict[str, str]:
    return {name: hmac_value(key, value) for name, value in sorted(context.items())}


def outcome_of(status: int) -> str:
    if status < 400:
        return "success"
    if status == 401:
        return "unauthenticated"
    if status == 403:
        return "denied"
    if status < 500:
        return "failed"
    return "error"


@dataclass
class RequestFacts:
    """What handlers learn while serving a request, for its record (filled as they go)."""

    key: str | None = None
    backend: str | None = None
    version: int | None = None
    contexts: list[Mapping[str, str]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (code, detail) of the problem answered
    items: int | None = None  # a batch's size


def build_event(
    *,
    request_id: str,
    principal: str | None,
    client_request_id: str | None = None,
    method: str,
    route: str,
    status: int,
    latency_ms: float,
    facts: RequestFacts,
    calls: Sequence[tuple[str, str, str]],
    hmac_key: bytes,
) -> dict[str, Any]:
    decisions = facts.decisions
    deciding = next((d for d in decisions if not d.allowed), decisions[0] if decisions else None)
    event: dict[str, Any] = {
        "type": "event",
        "request_id": request_id,
        "client_request_id": client_request_id,
        "principal": principal,
        "roles": list(deciding.roles) if deciding else [],
        "operation": deciding.operation if deciding else f"{method} {route}",
        "method": method,
        "route": route,
        "key": facts.key,
        "version": facts.version,
        "backend": facts.backend,
        "status": status,
        "outcome": outcome_of(status),
        "latency_ms": round(latency_ms, 3),
        "backend_calls": [{"backend": b, "operation": op, "id": cid} for b, op, cid in calls],
    }
    if deciding is not None:
        event["decision"] = {
            "allowed": deciding.allowed,
            "rule": deciding.rule,
            "grant": deciding.grant,
            "reason": deciding.reason,
        }
        if len(decisions) > 1:
            event["decisions"] = [
                {"operation": d.operation, "allowed": d.allowed, "rule": d.rule, "grant": d.grant}
                for d in decisions
            ]
    if facts.error is not None:
        event["error"] = {"code": facts.error[0], "detail": facts.error[1]}
    if facts.contexts:
        hashed = [hmac_context(hmac_key, c) for c in facts.contexts]
        unique = [dict(t) for t in dict.fromkeys(tuple(sorted(h.items())) for h in hashed)]
        if len(unique) == 1:
            event["context"] = unique[0]
        else:
            event["contexts"] = unique
    if facts.items is not None:
        event["items"] = facts.items
    return event
