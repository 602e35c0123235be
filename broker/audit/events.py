"""One audit record per request: who, what, on which key, the decision, the outcome, the evidence.

Context values are HMAC'd with a key the broker holds and the log does not (as
Vault's audit device does), so an auditor can check whether a record used a given
value (``POST /v1/audit/hmac``) without the log revealing it. Plaintext, key
material, data keys and tokens never reach a record: nothing here reads a body.
Every free-text field (error detail, decision reason) is cut to :data:`MAX_TEXT`
characters, so no caller can make a record large by sending a large value.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.policy.model import Decision
from broker.requestvars import parse_unnumbered

# The longest free text (error detail, reason) a record keeps; the rest is cut, saying so.
MAX_TEXT = 512
# The most characters of (HMAC'd) encryption contexts a record keeps; see _within_budget.
MAX_CONTEXT_CHARS = 16 * 1024


def hmac_value(key: bytes, value: str) -> str:
    """``surrogatepass``: a str that is not valid Unicode still gets its own HMAC, never an exception."""
    return "hmac-sha256:" + hmac.new(key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def hmac_context(key: bytes, context: Mapping[str, str]) -> dict[str, str]:
    return {name: hmac_value(key, value) for name, value in sorted(context.items())}


def bounded(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, marked when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters cut]"


def _within_budget(contexts: list[dict[str, str]]) -> list[dict[str, str]]:
    """The first contexts whose field names and HMACs fit :data:`MAX_CONTEXT_CHARS`.

    A batch may carry a different context per item, each with long field names (the
    caller's text); without a budget one request, even a denied one, makes a record of
    hundreds of kilobytes. The rest are counted, not kept.
    """
    kept, used = [], 0
    for context in contexts:
        used += sum(len(k) + len(v) for k, v in context.items())
        if used > MAX_CONTEXT_CHARS:
            break
        kept.append(context)
    return kept


def outcome_of(status: int, decisions: Sequence[Decision] = (), items: int | None = None) -> str:
    """The record's outcome: the HTTP status, and for a batch answered 200 its items' decisions.

    A batch fails item by item (each denied item has one denied decision), so a batch whose
    every item was denied is ``denied`` and one with some denied items ``partial``.
    """
    if status < 400:
        denied = sum(1 for d in decisions if not d.allowed)
        if items is not None and denied:
            return "denied" if denied >= items else "partial"
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
    # Keys the request used besides ``key`` (a rewrap's target), so the key filter finds it there too.
    other_keys: list[str] = field(default_factory=list)
    # An Idempotency-Key request: its record (a hash prefix) and whether the answer was a replay.
    idempotency: dict[str, Any] | None = None


def backend_call(backend: str, operation: str, call_id: str) -> dict[str, Any]:
    """One noted backend call as the record keeps it; an unnumbered call keeps what identifies it."""
    found = parse_unnumbered(call_id)
    if found is None:
        return {"backend": backend, "operation": operation, "id": call_id}
    status, sent_id, path = found
    return {
        "backend": backend,
        "operation": operation,
        "id": None,
        "status": status,
        "sent_request_id": sent_id,
        "path": path,
    }


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
        "outcome": outcome_of(status, decisions, facts.items),
        "latency_ms": round(latency_ms, 3),
        "backend_calls": [backend_call(b, op, cid) for b, op, cid in calls],
    }
    keys = list(dict.fromkeys(k for k in (facts.key, *facts.other_keys) if k))
    if len(keys) > 1:
        event["keys"] = keys
    if deciding is not None:
        event["decision"] = {
            "allowed": deciding.allowed,
            "rule": deciding.rule,
            "grant": deciding.grant,
            "reason": bounded(deciding.reason),
        }
        if len(decisions) > 1:
            event["decisions"] = [
                {"operation": d.operation, "allowed": d.allowed, "rule": d.rule, "grant": d.grant}
                for d in decisions
            ]
    if facts.idempotency is not None:
        event["idempotency"] = facts.idempotency
    if facts.error is not None:
        event["error"] = {"code": bounded(facts.error[0], 64), "detail": bounded(facts.error[1])}
    if facts.contexts:
        hashed = [hmac_context(hmac_key, c) for c in facts.contexts]
        unique = [dict(t) for t in dict.fromkeys(tuple(sorted(h.items())) for h in hashed)]
        kept = _within_budget(unique)
        if len(unique) == 1 and kept:
            event["context"] = unique[0]
        else:
            event["contexts"] = kept
            if len(kept) < len(unique):
                event["contexts_omitted"] = len(unique) - len(kept)
    if facts.items is not None:
        event["items"] = facts.items
        event["items_denied"] = sum(1 for d in decisions if not d.allowed)
    return event
