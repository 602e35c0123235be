"""The policy decision: pure, synchronous, no I/O.

``decide(policy, request, grants, now)`` answers one question — may this principal
perform this operation (on this key, with this context)? — and says which rule or
grant decided and why. The order is:

1. the config's break-glass administrators are allowed, before any stored role is
   looked at (a stored deny rule bound by a glob must not lock them out);
2. deny by default: a principal bound to no role and holding no grant gets nothing;
3. an explicit ``deny`` rule that matches wins over everything, grants included;
4. an ``allow`` rule that matches allows;
5. an unexpired grant to this principal on this key, for this operation and a
   context that meets its constraint, allows — and only if the grant's granter,
   deciding by its own rules now, may do exactly this request (same key, same
   context): a grant never gives more than its granter holds;
6. otherwise deny, naming the rules that came close and what they missed.

A rule matches when it names the operation (exactly, ``*`` or a family glob such
as ``crypto.*``), its key selector matches the key (an operation that concerns no
single key matches only rules without a key selector, so a key-scoped rule never
leaks into ``policy.write``), and the context meets its conditions. Templates such
as ``{principal.name}`` in selectors and conditions are filled from the caller;
where the template is a glob (key names), the filled-in value is escaped, so a
certificate named ``*`` matches only a key literally named so, not every key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from fnmatch import fnmatchcase

from broker.policy.model import (
    BREAK_GLASS_ROLE,
    GRANT_RETIRE,
    AccessRequest,
    ContextCondition,
    Decision,
    Grant,
    KeyFacts,
    KeySelector,
    PolicySet,
    Principal,
    Rule,
    is_key_operation,
    principal_from_id,
)

TEMPLATE_RE = re.compile(r"\{principal\.(name|kind|id)\}")


_GLOB_SPECIAL = re.compile(r"([*?\[])")


def fill(template: str, principal: Principal) -> str:
    """Replace ``{principal.name}``, ``{principal.kind}`` and ``{principal.id}`` (for exact comparisons)."""
    return TEMPLATE_RE.sub(lambda m: str(getattr(principal, m.group(1))), template)


def glob_escape(value: str) -> str:
    """``value`` as an fnmatch pattern that matches exactly ``value`` (``*`` → ``[*]``, ...)."""
    return _GLOB_SPECIAL.sub(r"[\1]", value)


def fill_glob(template: str, principal: Principal) -> str:
    """Fill a glob template: the template's own wildcards stay, the caller's values are literal.

    A certificate's name is chosen by whoever asked for the certificate; substituted
    unescaped, a CN ``*`` would turn ``{principal.name}-*`` into ``*-*``.
    """
    if "{" not in template:  # most selectors hold no template: skip the substitution
        return template
    return TEMPLATE_RE.sub(lambda m: glob_escape(str(getattr(principal, m.group(1)))), template)


def names_operation(rule: Rule, operation: str) -> bool:
    return any(fnmatchcase(operation, pattern) for pattern in rule.operations)


def decide(
    policy: PolicySet,
    request: AccessRequest,
    grants: Sequence[Grant] = (),
    *,
    now: datetime,
    grant_to_retire: Grant | None = None,
) -> Decision:
    principal, op = request.principal, request.operation
    roles = policy.roles_of(principal)

    if op == GRANT_RETIRE:
        return _retire(request, roles, grant_to_retire)
    if principal.id in policy.break_glass:
        return Decision(
            True,
            op,
            f"allowed: {principal.id} is a break-glass administrator (config server.administrators)",
            roles,
            rule=BREAK_GLASS_ROLE,
        )

    near: list[str] = []
    allowed_by: str | None = None
    for role_name in roles:
        role = policy.roles.get(role_name)
        if role is None:  # a binding to a role that no longer exists grants nothing
            continue
        for rule in role.rules:
            if not names_operation(rule, op):
                continue
            miss = _mismatch(rule, request)
            if miss is not None:
                near.append(f"{_label(role_name, rule)}: {miss}")
                continue
            if rule.effect == "deny":
                return Decision(
                    False,
                    op,
                    f"explicitly denied by rule {_label(role_name, rule)}",
                    roles,
                    rule=_label(role_name, rule),
                )
            if allowed_by is None:
                allowed_by = _label(role_name, rule)
    if allowed_by is not None:
        return Decision(True, op, f"allowed by rule {allowed_by}", roles, rule=allowed_by)

    grant_misses: list[str] = []
    for grant in _grants_for(request, grants):
        miss = _grant_mismatch(grant, request, now)
        if miss is None:
            miss = _granter_mismatch(policy, grant, request, now)
        if miss is None:
            return Decision(True, op, f"allowed by grant {grant.id}", roles, grant=grant.id)
        grant_misses.append(f"grant {grant.id}: {miss}")

    target = f" on key {request.key.name}" if request.key is not None else ""
    if not roles and not grant_misses:
        why = f"{principal.id} is bound to no role"
    else:
        bound = ", ".join(roles) if roles else "none"
        why = f"no rule of the roles ({bound}) allows it"
    return Decision(
        False,
        op,
        f"{op}{target} is denied: {why}",
        roles,
        near_misses=tuple(near + grant_misses),
    )


def _retire(request: AccessRequest, roles: tuple[str, ...], grant: Grant | None) -> Decision:
    if grant is not None and grant.grantee == request.principal.id:
        return Decision(True, GRANT_RETIRE, "the grantee retires its own grant", roles, grant=grant.id)
    return Decision(False, GRANT_RETIRE, "only the grantee may retire a grant", roles)


def _label(role: str, rule: Rule) -> str:
    return rule.id if rule.id else role


def _mismatch(rule: Rule, request: AccessRequest) -> str | None:
    """Why the rule does not apply to the request, or None if it does."""
    key = request.key
    if not is_key_operation(request.operation) or key is None:
        if not rule.keys.empty:
            return "names keys, and this operation concerns no single key"
    else:
        miss = _key_mismatch(rule.keys, key, request.principal)
        if miss is not None:
            return miss
    return _context_mismatch(rule.context, request.context or {}, request.principal)


def _key_mismatch(sel: KeySelector, key: KeyFacts, who: Principal) -> str | None:
    if sel.names and not any(fnmatchcase(key.name, fill_glob(p, who)) for p in sel.names):
        return f"key name {key.name} matches none of {_show(sel.names)}"
    if sel.backends and key.backend not in sel.backends:
        return f"backend {key.backend} is not one of {_show(sel.backends)}"
    if sel.environments and key.environment not in sel.environments:
        return f"environment {key.environment} is not one of {_show(sel.environments)}"
    for tag, template in sel.tags:
        want = fill(template, who)
        if key.tags.get(tag) != want:
            return f"key tag {tag} is not {want!r}"
    return None


def _context_mismatch(cond: ContextCondition, context: Mapping[str, str], who: Principal) -> str | None:
    # Messages name context fields and the expected value, never the caller's value.
    for name in cond.required:
        if name not in context:
            return f"context field {name!r} is required"
    for name, template in cond.equals:
        want = fill(template, who)
        if context.get(name) != want:
            return f"context field {name!r} must be {want!r}"
    for name, options in cond.allowed:
        choices = [fill(o, who) for o in options]
        if context.get(name) not in choices:
            return f"context field {name!r} must be one of {_show(choices)}"
    return None


def _grants_for(request: AccessRequest, grants: Iterable[Grant]) -> list[Grant]:
    if request.key is None:
        return []
    return [g for g in grants if g.grantee == request.principal.id and g.key == request.key.name]


def _grant_mismatch(grant: Grant, request: AccessRequest, now: datetime) -> str | None:
    if grant.expired(now):
        return "expired"
    if request.operation not in grant.operations:
        return f"does not cover {request.operation}"
    context = dict(request.context or {})
    if grant.context_equals is not None and context != dict(grant.context_equals):
        return "context is not the one the grant names"
    if grant.context_subset is not None and any(context.get(k) != v for k, v in grant.context_subset.items()):
        return "context lacks pairs the grant requires"
    return None


def _granter_mismatch(policy: PolicySet, grant: Grant, request: AccessRequest, now: datetime) -> str | None:
    """Why the grant's granter could not make this exact request itself now, or None if it could.

    Checking the grant's constraint at creation is not enough: a ``context_subset``
    leaves every other field open, and a granter's deny rule may depend on one of
    them; the granter's roles may also have changed since. Only the granter's rules
    count, never its own grants: a grant cannot be passed on.
    """
    try:
        granter = principal_from_id(grant.granter)
    except ValueError:
        return f"its granter {grant.granter!r} is not a principal id"
    ask = AccessRequest(granter, request.operation, request.key, request.context)
    decision = decide(policy, ask, (), now=now)
    if decision.allowed:
        return None
    # Not the granter's reason: the grantee may see near misses, and the granter's rules are not its business.
    return f"its granter {grant.granter} may not make this request itself now"


def selecting_rules(policy: PolicySet, principal: Principal, key: KeyFacts) -> frozenset[str]:
    """The principal's rules (allow or deny, for any operation) whose key selector selects ``key``.

    Each is named ``role[index]`` (and its id, if it has one). Rules with no key selector
    select every key, so they are always in the set.
    """
    found = set()
    for role_name in policy.roles_of(principal):
        role = policy.roles.get(role_name)
        if role is None:
            continue
        for index, rule in enumerate(role.rules):
            if _key_mismatch(rule.keys, key, principal) is None:
                place = f"{role_name}[{index}]"
                found.add(place if rule.id in ("", place) else f"{place} ({rule.id})")
    return frozenset(found)


def retag_refusal(
    policy: PolicySet, principal: Principal, before: KeyFacts, after: KeyFacts, *, now: datetime
) -> str | None:
    """Why ``principal`` may not change a key's facts from ``before`` to ``after``, or None.

    ``key.update`` must be allowed on both. And the set of the principal's own rules
    that select the key must stay the same: whoever may update a key must not move
    it out of a deny rule that binds it, nor into an allow rule of its own it did not
    already have there, so no change of its own makes any of its decisions on the key
    differ. (Equal sets give equal decisions for every operation and context: a rule
    applies exactly when it names the operation, selects the key and its context
    condition holds.) Break-glass administrators are not bound by stored rules at all.
    """
    if principal.id in policy.break_glass:
        return None
    for facts, when in ((before, "as it is"), (after, "as it would be")):
        decision = decide(policy, AccessRequest(principal, "key.update", facts), now=now)
        if not decision.allowed:
            return f"key.update on key {before.name} {when} is denied: {decision.reason}"
    was, would = selecting_rules(policy, principal, before), selecting_rules(policy, principal, after)
    if was == would:
        return None
    changes = []
    if would - was:
        changes.append(f"would start applying: {_show(sorted(would - was))}")
    if was - would:
        changes.append(f"would stop applying: {_show(sorted(was - would))}")
    return (
        f"this change of key {before.name}'s tags would change which of your own rules apply to it "
        f"({'; '.join(changes)}), and with them what you may do with it; ask someone whose rules "
        "do not depend on these tags to change them"
    )


def may_on_some_key(policy: PolicySet, principal: Principal, operation: str) -> Decision:
    """Whether ``principal`` could be allowed ``operation`` (key-scoped, without a context) on
    some key, decided before the key's facts are known (before a request body is read).

    Allowed when a break-glass administrator, or when an allow rule names the operation
    and asks for no context, unless a deny rule with no key selector and no context
    condition names it (that one denies every key). The full decision, on the key's
    facts, still follows: this only stops a caller that can never succeed early.
    """
    roles = policy.roles_of(principal)
    if principal.id in policy.break_glass:
        return Decision(True, operation, f"allowed: {principal.id} is a break-glass administrator", roles)
    allow: str | None = None
    for role_name in roles:
        role = policy.roles.get(role_name)
        if role is None:
            continue
        for rule in role.rules:
            if not names_operation(rule, operation) or not rule.context.empty:
                continue
            if rule.effect == "deny" and rule.keys.empty:
                label = _label(role_name, rule)
                return Decision(False, operation, f"explicitly denied by rule {label}", roles, rule=label)
            if rule.effect != "deny" and allow is None:
                allow = _label(role_name, rule)
    if allow is not None:
        return Decision(True, operation, f"rule {allow} allows it on some keys", roles)
    if not roles:
        return Decision(False, operation, f"{operation} is denied: {principal.id} is bound to no role", roles)
    bound = ", ".join(roles)
    return Decision(
        False, operation, f"{operation} is denied: no rule of the roles ({bound}) allows it on any key", roles
    )


def _show(values: Iterable[str]) -> str:
    return "[" + ", ".join(values) + "]"


def exceeds_granter(
    policy: PolicySet,
    granter: Principal,
    key: KeyFacts,
    operations: Sequence[str],
    context_equals: Mapping[str, str] | None,
    context_subset: Mapping[str, str] | None,
    *,
    now: datetime,
) -> list[str]:
    """What a proposed grant would give beyond the granter's own rules (empty: nothing).

    Each operation is decided for the granter with the grant's context constraint as
    the context: an allow rule that needs a field the constraint leaves open does
    not match, so such a grant is refused. This check at creation is not enough on
    its own — a granter's deny rule may depend on a field the constraint leaves open
    (``context_subset``), and the granter's roles may change — so every use is
    decided against the granter's rules again (:func:`_granter_mismatch`). The
    granter's own grants do not count: a grant cannot be passed on.
    """
    context = dict(context_equals if context_equals is not None else context_subset or {})
    refused = []
    for op in operations:
        decision = decide(policy, AccessRequest(granter, op, key, context), (), now=now)
        if not decision.allowed:
            refused.append(op)
    return refused
