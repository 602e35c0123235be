"""The policy engine: pure decisions from roles, bindings, grants, context and an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.policy.document import parse_document
from broker.policy.engine import decide, exceeds_granter
from broker.policy.model import (
    GRANT_RETIRE,
    OPERATIONS,
    AccessRequest,
    Grant,
    KeyFacts,
    PolicySet,
    Principal,
    grant_token,
    parse_grant_token,
    principal_from_id,
)
from broker.state.policies import default_policy
from tests.role_table import BACKENDS, ENVIRONMENTS, ROLES, expected

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
TD = "spiffe://bank.example"


def who(kind: str, name: str) -> Principal:
    return principal_from_id(f"{TD}/{kind}/{name}")


def key(env: str = "dev", backend: str = "vault", name: str = "k1", **tags: str) -> KeyFacts:
    return KeyFacts(name, backend, env, tags)


def bound(policy: PolicySet, principal: Principal, *roles: str) -> PolicySet:
    return PolicySet(policy.roles, {**policy.bindings, principal.id: roles}, policy.settings)


def policy(doc: dict[str, object]) -> PolicySet:
    return parse_document(doc)


@pytest.mark.parametrize("role", ROLES)
def test_shipped_roles_decide_exactly_as_the_role_table_says(role: str) -> None:
    """Every operation x environment x backend, on keys tagged for the caller and keys that are not."""
    caller = who("user", "pat")
    shipped = bound(default_policy(), caller, role)
    wrong = []

    for op in sorted(OPERATIONS):
        for env in ENVIRONMENTS:
            for backend in BACKENDS:
                for tagged in (True, False):
                    facts = key(env, backend, **({"app": "pat"} if tagged else {"app": "other"}))
                    got = decide(shipped, AccessRequest(caller, op, facts, {}), now=NOW).allowed
                    if got != expected(role, op, env, tagged_for_caller=tagged):
                        wrong.append((op, env, backend, tagged, got))

    assert wrong == []


def test_an_unbound_principal_gets_nothing() -> None:
    """Deny by default: no binding, no grant, no operation — the reason says so."""
    stranger = who("user", "eve")

    decision = decide(default_policy(), AccessRequest(stranger, "key.read", key()), now=NOW)

    assert (decision.allowed, decision.reason) == (
        False,
        f"key.read on key k1 is denied: {stranger.id} is bound to no role",
    )


def test_explicit_deny_beats_allow_and_grants() -> None:
    """A deny rule for prod wins over an allow-everything rule and over a grant."""
    p = policy(
        {
            "roles": {
                "ops": {
                    "rules": [
                        {"operations": ["*"]},
                        {
                            "id": "no-prod-decrypt",
                            "effect": "deny",
                            "operations": ["crypto.decrypt"],
                            "keys": {"environment": ["prod"]},
                        },
                    ]
                }
            },
        }
    )
    caller = who("user", "ops1")
    p = bound(p, caller, "ops")
    grant = _grant(caller.id, "k1", ("crypto.decrypt",))

    prod = decide(p, AccessRequest(caller, "crypto.decrypt", key("prod"), {}), [grant], now=NOW)
    dev = decide(p, AccessRequest(caller, "crypto.decrypt", key("dev"), {}), now=NOW)

    assert (prod.allowed, prod.rule, prod.reason) == (
        False,
        "no-prod-decrypt",
        "explicitly denied by rule no-prod-decrypt",
    )
    assert (dev.allowed, dev.rule) == (True, "ops[0]")


def test_context_templated_from_the_principal() -> None:
    """tenant = {principal.name}: an application's own tenant only; the near miss names the field."""
    p = policy(
        {
            "roles": {
                "tenant-app": {
                    "rules": [
                        {
                            "operations": ["crypto.encrypt"],
                            "context": {"equals": {"tenant": "{principal.name}"}},
                        }
                    ]
                }
            },
            "bindings": {f"{TD}/app/*": ["tenant-app"]},
        }
    )
    acme = who("app", "acme")

    own = decide(p, AccessRequest(acme, "crypto.encrypt", key(), {"tenant": "acme", "x": "1"}), now=NOW)
    other = decide(p, AccessRequest(acme, "crypto.encrypt", key(), {"tenant": "globex"}), now=NOW)
    missing = decide(p, AccessRequest(acme, "crypto.encrypt", key(), {}), now=NOW)

    assert own.allowed
    assert (other.allowed, other.near_misses) == (
        False,
        ("tenant-app[0]: context field 'tenant' must be 'acme'",),
    )
    assert missing.allowed is False
    assert "globex" not in other.reason + "".join(other.near_misses)


def test_required_and_allowed_context_fields() -> None:
    """required: present; allowed: one of a set (templated members too)."""
    p = policy(
        {
            "roles": {
                "r": {
                    "rules": [
                        {
                            "operations": ["crypto.decrypt"],
                            "context": {
                                "required": ["purpose"],
                                "allowed": {"region": ["eu", "{principal.name}"]},
                            },
                        }
                    ]
                }
            }
        }
    )
    caller = who("app", "us")
    p = bound(p, caller, "r")

    def ok(ctx: dict[str, str]) -> bool:
        return decide(p, AccessRequest(caller, "crypto.decrypt", key(), ctx), now=NOW).allowed

    assert [ok({"purpose": "x", "region": "eu"}), ok({"purpose": "x", "region": "us"})] == [True, True]
    assert [ok({"region": "eu"}), ok({"purpose": "x", "region": "apac"}), ok({"purpose": "x"})] == [
        False,
        False,
        False,
    ]


def test_key_scoped_rules_never_match_operations_on_no_key() -> None:
    """A rule with a key selector cannot be stretched to policy.write or key.list."""
    p = policy({"roles": {"r": {"rules": [{"operations": ["*"], "keys": {"name": ["team-*"]}}]}}})
    caller = who("user", "t")
    p = bound(p, caller, "r")

    on_key = decide(p, AccessRequest(caller, "key.rotate", key(name="team-a")), now=NOW)
    other_key = decide(p, AccessRequest(caller, "key.rotate", key(name="payments")), now=NOW)
    global_op = decide(p, AccessRequest(caller, "policy.write"), now=NOW)

    assert [on_key.allowed, other_key.allowed, global_op.allowed] == [True, False, False]
    assert other_key.near_misses == ("r[0]: key name payments matches none of [team-*]",)


def test_bindings_by_glob_and_exact_id_combine() -> None:
    """A glob entry and an exact entry both apply; roles come back sorted and unique."""
    p = bound(default_policy(), principal_from_id(f"{TD}/app/billing"), "developer")
    p = PolicySet(p.roles, {**p.bindings, f"{TD}/app/*": ("application", "developer")}, p.settings)

    assert p.roles_of(principal_from_id(f"{TD}/app/billing")) == ("application", "developer")
    assert p.roles_of(principal_from_id(f"{TD}/user/billing")) == ()


def _grant(grantee: str, key_name: str, ops: tuple[str, ...], **kw: object) -> Grant:
    return Grant(
        id="g-1",
        key=key_name,
        grantee=grantee,
        operations=ops,
        created_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        granter=f"{TD}/user/admin",
        **kw,  # type: ignore[arg-type]
    )


def _granter_bound() -> PolicySet:
    """The shipped roles with the grants' granter (user/admin) bound to administrator."""
    return bound(default_policy(), who("user", "admin"), "administrator")


def test_a_grant_works_until_the_second_it_expires() -> None:
    """Allowed one second before expiry; denied at expiry and after; the clock is injected."""
    caller = who("app", "batch")
    g = _grant(caller.id, "k1", ("crypto.decrypt",))
    ask = AccessRequest(caller, "crypto.decrypt", key(), {})

    before = decide(_granter_bound(), ask, [g], now=g.expires_at - timedelta(seconds=1))
    at = decide(_granter_bound(), ask, [g], now=g.expires_at)
    after = decide(_granter_bound(), ask, [g], now=g.expires_at + timedelta(seconds=1))

    assert (before.allowed, before.grant) == (True, "g-1")
    assert [at.allowed, after.allowed] == [False, False]
    assert after.near_misses == ("grant g-1: expired",)


def test_a_grant_binds_its_grantee_key_operations_and_context() -> None:
    """Another principal, key or operation gets nothing; context_equals is exact, context_subset contains."""
    caller = who("app", "batch")
    exact = _grant(caller.id, "k1", ("crypto.decrypt",), context_equals={"tenant": "acme"})
    subset = _grant(caller.id, "k1", ("crypto.encrypt",), context_subset={"tenant": "acme"})

    def ok(p: Principal, op: str, k: str, ctx: dict[str, str]) -> bool:
        return decide(
            _granter_bound(), AccessRequest(p, op, key(name=k), ctx), [exact, subset], now=NOW
        ).allowed

    assert ok(caller, "crypto.decrypt", "k1", {"tenant": "acme"})
    assert not ok(caller, "crypto.decrypt", "k1", {"tenant": "acme", "more": "x"})
    assert ok(caller, "crypto.encrypt", "k1", {"tenant": "acme", "more": "x"})
    assert not ok(caller, "crypto.encrypt", "k1", {"tenant": "globex"})
    assert not ok(who("app", "other"), "crypto.decrypt", "k1", {"tenant": "acme"})
    assert not ok(caller, "crypto.decrypt", "k2", {"tenant": "acme"})
    assert not ok(caller, "crypto.sign", "k1", {"tenant": "acme"})


def test_a_grant_cannot_give_more_than_the_granter_holds() -> None:
    """A developer may grant dev crypto but not prod crypto; a context-bound right needs the constraint."""
    dev_person = who("user", "dana")
    p = bound(default_policy(), dev_person, "developer")
    tenant_policy = policy(
        {
            "roles": {
                "t": {
                    "rules": [
                        {"operations": ["crypto.*"], "context": {"equals": {"tenant": "{principal.name}"}}}
                    ]
                }
            },
            "bindings": {f"{TD}/app/acme": ["t"]},
        }
    )
    acme = who("app", "acme")

    assert exceeds_granter(p, dev_person, key("dev"), ["crypto.decrypt"], None, None, now=NOW) == []
    assert exceeds_granter(p, dev_person, key("prod"), ["crypto.decrypt"], None, None, now=NOW) == [
        "crypto.decrypt"
    ]
    assert exceeds_granter(tenant_policy, acme, key(), ["crypto.decrypt"], None, None, now=NOW) == [
        "crypto.decrypt"
    ]
    assert (
        exceeds_granter(tenant_policy, acme, key(), ["crypto.decrypt"], None, {"tenant": "acme"}, now=NOW)
        == []
    )
    assert exceeds_granter(
        tenant_policy, acme, key(), ["crypto.decrypt"], {"tenant": "globex"}, None, now=NOW
    ) == ["crypto.decrypt"]


def test_only_the_grantee_retires_a_grant() -> None:
    """grant.retire needs no rule, but only the grantee gets it."""
    grantee, other = who("app", "batch"), who("user", "admin")
    g = _grant(grantee.id, "k1", ("crypto.decrypt",))
    p = bound(default_policy(), other, "administrator")

    mine = decide(p, AccessRequest(grantee, GRANT_RETIRE, key()), now=NOW, grant_to_retire=g)
    theirs = decide(p, AccessRequest(other, GRANT_RETIRE, key()), now=NOW, grant_to_retire=g)
    missing = decide(p, AccessRequest(grantee, GRANT_RETIRE, key()), now=NOW, grant_to_retire=None)

    assert [mine.allowed, theirs.allowed, missing.allowed] == [True, False, False]


def test_principal_ids_and_grant_tokens_parse_back() -> None:
    """SPIFFE ids and cn: ids become principals; anything else is refused; tokens round-trip."""
    g = _grant("cn:x", "pay.ments", ("crypto.decrypt",))

    assert principal_from_id("spiffe://Bank.Example/app/billing") == Principal(
        "app", "billing", f"{TD}/app/billing"
    )
    assert principal_from_id("cn:legacy") == Principal("cn", "legacy", "cn:legacy")
    for bad in ("billing", "spiffe://bank.example/billing", "cn:", "spiffe://bank.example/a/b/c"):
        with pytest.raises(ValueError, match="not a principal id"):
            principal_from_id(bad)
    assert parse_grant_token(grant_token(g)) == ("pay.ments", "g-1")
    with pytest.raises(ValueError, match="not a grant token"):
        parse_grant_token("g-1")


def test_a_grant_never_gives_more_than_its_granter_may_do_with_that_exact_request_now() -> None:
    """context_subset {t: a} leaves other fields open: the grantee adding class=secret, which the
    granter is explicitly denied, is refused; so is anything once the granter loses its role."""
    p = policy(
        {
            "roles": {
                "owner": {
                    "rules": [
                        {"operations": ["crypto.*"]},
                        {
                            "id": "no-secret",
                            "effect": "deny",
                            "operations": ["crypto.decrypt"],
                            "context": {"equals": {"class": "secret"}},
                        },
                    ]
                }
            }
        }
    )
    granter, grantee = who("user", "owner"), who("app", "batch")
    with_owner = bound(p, granter, "owner")
    g = Grant(
        id="g-9",
        key="k1",
        grantee=grantee.id,
        operations=("crypto.decrypt",),
        created_at=NOW,
        expires_at=NOW + timedelta(hours=1),
        granter=granter.id,
        context_subset={"t": "a"},
    )

    def ask(policy_set: PolicySet, ctx: dict[str, str]) -> bool:
        return decide(policy_set, AccessRequest(grantee, "crypto.decrypt", key(), ctx), [g], now=NOW).allowed

    assert exceeds_granter(with_owner, granter, key(), ["crypto.decrypt"], None, {"t": "a"}, now=NOW) == []
    assert ask(with_owner, {"t": "a"})
    assert not ask(with_owner, {"t": "a", "class": "secret"})
    assert ask(with_owner, {"t": "a", "class": "public"})
    assert not ask(p, {"t": "a"})  # the granter is no longer bound to owner
    denied = decide(
        with_owner,
        AccessRequest(grantee, "crypto.decrypt", key(), {"t": "a", "class": "secret"}),
        [g],
        now=NOW,
    )
    assert denied.near_misses == (
        f"grant g-9: its granter {granter.id} may not make this request itself now",
    )


def test_break_glass_is_decided_before_any_stored_role() -> None:
    """A stored deny-everything role bound by a glob that covers the break-glass administrator
    denies everyone else, but not the administrator listed in the config."""
    p = policy(
        {
            "roles": {"lockdown": {"rules": [{"effect": "deny", "operations": ["*"]}]}},
            "bindings": {f"{TD}/user/*": ["lockdown"]},
        }
    )
    admin, other = who("user", "admin"), who("user", "eve")
    effective = PolicySet(p.roles, p.bindings, p.settings, break_glass=frozenset({admin.id}))

    mine = decide(effective, AccessRequest(admin, "policy.write"), now=NOW)
    theirs = decide(effective, AccessRequest(other, "policy.write"), now=NOW)

    assert (mine.allowed, mine.rule) == (True, "config:administrators")
    assert (theirs.allowed, theirs.rule) == (False, "lockdown[0]")


@pytest.mark.parametrize("name", ["*", "?", "[a-z]*", "a*", "[!x]"])
def test_a_certificate_name_is_a_literal_in_key_name_globs(name: str) -> None:
    """{principal.name} filled into a key-name glob is escaped: a CN made of glob characters
    matches only a key literally named after it, not every key; the rule's own '*' still works."""
    p = policy(
        {
            "roles": {
                "own-keys": {
                    "rules": [{"operations": ["crypto.encrypt"], "keys": {"name": "{principal.name}-*"}}]
                }
            },
            "bindings": {"cn:*": ["own-keys"]},
        }
    )
    caller = principal_from_id(f"cn:{name}")

    def ok(key_name: str) -> bool:
        return decide(p, AccessRequest(caller, "crypto.encrypt", key(name=key_name), {}), now=NOW).allowed

    assert ok(f"{name}-1")
    assert not ok("payments-1")
    assert not ok("a-1")
    assert not ok("x-1")


def test_glob_escape_round_trips_every_special_character() -> None:
    """Each escaped value matches itself and nothing else of the same length."""
    from fnmatch import fnmatchcase

    from broker.policy.engine import glob_escape

    for value in ("*", "?", "[", "]", "[!]", "a[b]*?c", "plain"):
        assert fnmatchcase(value, glob_escape(value))
        assert not fnmatchcase("z" * len(value), glob_escape(value)) or value == "z" * len(value)


def test_a_named_rule_decides_and_misses_by_its_name() -> None:
    """Decisions and near misses say billing-app/read-invoices, not billing-app[0]."""
    p = policy(
        {
            "roles": {
                "billing-app": {
                    "rules": [
                        {
                            "name": "read-invoices",
                            "operations": ["crypto.decrypt"],
                            "keys": {"name": ["inv-*"]},
                        },
                    ]
                }
            },
            "bindings": {f"{TD}/app/billing": ["billing-app"]},
        }
    )
    billing = who("app", "billing")

    allowed = decide(p, AccessRequest(billing, "crypto.decrypt", key(name="inv-1"), {}), now=NOW)
    missed = decide(p, AccessRequest(billing, "crypto.decrypt", key(name="orders"), {}), now=NOW)

    assert (allowed.allowed, allowed.rule, allowed.reason) == (
        True,
        "billing-app/read-invoices",
        "allowed by rule billing-app/read-invoices",
    )
    assert not missed.allowed
    assert missed.near_misses[0].startswith("billing-app/read-invoices: ")
