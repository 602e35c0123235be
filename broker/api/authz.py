"""Every ``/v1`` request is decided by the policy engine before any backend is asked.

Handlers call :func:`authorize` (or :func:`key_for`, which reads the key and
authorizes on its metadata). A denial is a 403 whose detail says which operation
on which key was denied and why — but only to a principal that may read that key
or list keys: anyone else gets the same bare sentence whether the key exists or
not, so a 403 never confirms a key's existence. A missing key is a 404 only for a
principal that may list keys. ``key.create`` is first decided before the body is
read (:func:`authorize_some_key`), and a change of a key's tags may not change which
of the updater's own rules apply to it (:func:`tag_change_guard`).

Grants are read from Vault only when no rule already allows (the rare path), and
once per request and key. Every decision is kept on the request for the audit record.
While the stored policy document is invalid, everyone but the break-glass
administrators gets 503 ``policy_invalid`` (and the audit record says why), not a 403
that would look like an ordinary missing binding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aiohttp import web

from broker.api.state import AUDIT_FACTS, GRANTS, KEYS, POLICIES, PRINCIPAL
from broker.audit.events import RequestFacts
from broker.errors import Forbidden, NotFound, Unavailable
from broker.keys.model import Key
from broker.policy import engine
from broker.policy.model import AccessRequest, Decision, Grant, KeyFacts, Principal, is_key_operation
from broker.state.policies import Snapshot

_GRANTS_SEEN = "keybroker.grants_seen"


class PolicyInvalidError(Unavailable):
    """The stored policy document does not validate: nobody but break-glass administrators acts."""

    code = "policy_invalid"
    title = "Policy invalid"
    # Only an administrator's repair ends this: clients are not told to retry.
    retry_after = None


def policy_invalid_reason(problem: str) -> str:
    return (
        f"policy_invalid: {problem}; every request by a principal that is not a break-glass "
        "administrator is refused (503) until a valid document is stored"
    )


def principal(request: web.Request) -> Principal:
    found: Principal = request[PRINCIPAL]
    return found


def facts(key: Key) -> KeyFacts:
    return KeyFacts(key.name, str(key.backend), key.environment, dict(key.tags))


async def _grants(request: web.Request, key: str) -> list[Grant]:
    seen: dict[str, list[Grant]] = request.setdefault(_GRANTS_SEEN, {})
    if key not in seen:
        seen[key] = await request.app[GRANTS].for_key(key)
    return seen[key]


def _in_force(request: web.Request, operation: str, context: Mapping[str, str] | None = None) -> Snapshot:
    """The policy snapshot to decide by; 503 ``policy_invalid`` for all but break-glass when it is broken."""
    store = request.app[POLICIES]
    snapshot = store.current()
    if snapshot.invalid and not store.is_break_glass(principal(request).id):
        # Not an ordinary 403 "bound to no role": the caller's bindings may be fine, and
        # whoever looks (the caller, the audit trail) must see that the policy is broken.
        reason = policy_invalid_reason(snapshot.invalid)
        record(request, Decision(False, operation, reason), context)
        raise PolicyInvalidError(
            "the stored policy document is invalid; only break-glass administrators can act until "
            "a valid one is stored (see /v1/sys/health)",
            backend="policy",
        )
    return snapshot


async def decide(
    request: web.Request,
    operation: str,
    key: Key | KeyFacts | None = None,
    context: Mapping[str, str] | None = None,
    *,
    with_grants: bool = True,
) -> Decision:
    """The engine's answer for the caller, with grants consulted only when rules do not allow."""
    snapshot = _in_force(request, operation, context)
    now = request.app[KEYS].now()
    target = facts(key) if isinstance(key, Key) else key
    ask = AccessRequest(principal(request), operation, target, context)
    decision = engine.decide(snapshot.effective, ask, now=now)
    explicit_deny = decision.rule is not None
    if (
        not with_grants
        or decision.allowed
        or explicit_deny
        or target is None
        or not is_key_operation(operation)
    ):
        return decision
    grants = [g for g in await _grants(request, target.name) if g.grantee == ask.principal.id]
    if not grants:
        return decision
    return engine.decide(snapshot.effective, ask, grants, now=now)


def audit_facts(request: web.Request) -> RequestFacts:
    """The request's audit facts (a throwaway one outside the audit middleware, e.g. in unit tests)."""
    facts: RequestFacts = request.setdefault(AUDIT_FACTS, RequestFacts())
    return facts


def record(request: web.Request, decision: Decision, context: Mapping[str, str] | None = None) -> None:
    facts = audit_facts(request)
    facts.decisions.append(decision)
    if context:
        facts.contexts.append(context)


async def authorize(
    request: web.Request,
    operation: str,
    key: Key | KeyFacts | None = None,
    context: Mapping[str, str] | None = None,
) -> Decision:
    """Allow, or raise 403 with a detail that tells the caller only what it may know."""
    decision = await decide(request, operation, key, context)
    record(request, decision, context)
    if decision.allowed:
        return decision
    raise Forbidden(await denial_detail(request, decision, key))


async def denial_detail(request: web.Request, decision: Decision, key: Key | KeyFacts | None) -> str:
    """The decision's reason for a caller that may know the key exists, else the bare sentence
    a missing key gets (:func:`find_key`)."""
    # A creator names the key itself (in its body): the decision does not depend on whether it exists.
    if key is None or decision.operation == "key.create" or await may_know(request, key):
        return _explained(decision)
    return denied_bare(decision.operation, key.name)


def denied_bare(operation: str, name: str) -> str:
    """What a caller that may not know whether the key exists hears, whether it does or not."""
    return f"{operation} on key {name} is denied"


async def may_know(request: web.Request, key: Key | KeyFacts) -> bool:
    """May the caller learn that the key exists and why it was refused: it may read the key,
    or list keys (a lister gets 404 for a missing key anyway)."""
    if (await decide(request, "key.read", key)).allowed:
        return True
    return (await decide(request, "key.list")).allowed


async def authorize_some_key(request: web.Request, operation: str) -> None:
    """403 unless the caller could be allowed ``operation`` on some key: decided before a
    request body is read, so a caller that can never succeed costs no parsing and no
    body-sized error. The full decision on the key's facts follows in the handler."""
    snapshot = _in_force(request, operation)
    decision = engine.may_on_some_key(snapshot.effective, principal(request), operation)
    if not decision.allowed:
        # Only a refusal is recorded here: an allowed request gets its real decision later.
        record(request, decision)
        raise Forbidden(decision.reason)


def tag_change_guard(request: web.Request) -> Callable[[Key, Key], None]:
    """For :meth:`KeyService.patch`: refuse (403) a change of the key's facts by which the
    caller's own rules on the key would change (:func:`broker.policy.engine.retag_refusal`)."""
    snapshot = _in_force(request, "key.update")
    who = principal(request)

    def guard(before: Key, after: Key) -> None:
        if facts(before) == facts(after):
            return
        refusal = engine.retag_refusal(
            snapshot.effective, who, facts(before), facts(after), now=request.app[KEYS].now()
        )
        if refusal is not None:
            record(request, Decision(False, "key.update", refusal, snapshot.effective.roles_of(who)))
            raise Forbidden(refusal)

    return guard


def _explained(decision: Decision) -> str:
    if decision.near_misses:
        return f"{decision.reason} (closest: {decision.near_misses[0]})"
    return decision.reason


async def key_for(request: web.Request, operation: str, name: str) -> Key:
    """Read the key and authorize ``operation`` on it (without context: management operations).

    For a key that does not exist, a caller that may not list keys gets the same 403
    it would get for an existing key it may not see.
    """
    key = await find_key(request, operation, name, fresh=True)
    await authorize(request, operation, key)
    return key


async def find_key(request: web.Request, operation: str, name: str, *, fresh: bool = False) -> Key:
    """Read the key; a missing key is 404 only for a caller that may list keys, else 403.

    Crypto requests read through the key cache (``keys.cache_seconds``); management reads fresh.
    """
    facts = audit_facts(request)
    if facts.key is None:
        facts.key = name
    try:
        service = request.app[KEYS]
        key = await (service.get(name) if fresh else service.cached(name))
    except NotFound:
        if (await decide(request, "key.list")).allowed:
            raise
        decision = Decision(False, operation, denied_bare(operation, name), ())
        record(request, decision)
        raise Forbidden(decision.reason) from None
    if facts.key == key.name and facts.backend is None:
        facts.backend = str(key.backend)
    return key
