"""Red-team findings 1, 6 and 13 without HTTP: the tag-change rule, the "may create some key" check,
bounded quoting of caller values, printable stored text."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from broker.api import schemas
from broker.errors import BadRequest, Forbidden
from broker.keys.model import Key
from broker.keys.service import KeyService
from broker.policy.document import parse_document
from broker.policy.engine import may_on_some_key, retag_refusal, selecting_rules
from broker.policy.model import KeyFacts, PolicySet, Principal, principal_from_id
from broker.printable import shown
from tests.unit.test_key_cache import CountingRegistry
from tests.unit.test_key_model import active_key

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
MEMBER = principal_from_id("spiffe://bank.example/user/pat")
ADMIN = principal_from_id("spiffe://bank.example/user/root")


def team_policy(*, break_glass: frozenset[str] = frozenset()) -> PolicySet:
    """Members update/read/use team=payroll keys; decrypt of class=secret is denied; health for all."""
    p = parse_document(
        {
            "roles": {
                "member": {
                    "rules": [
                        {
                            "operations": ["key.update", "key.read", "crypto.*"],
                            "keys": {"tags": {"team": "payroll"}},
                        },
                        {
                            "id": "no-secret",
                            "effect": "deny",
                            "operations": ["crypto.decrypt"],
                            "keys": {"tags": {"class": "secret"}},
                        },
                        {"operations": ["crypto.decrypt"], "keys": {"tags": {"tier": "open"}}},
                        {"operations": ["sys.health"]},
                    ]
                }
            },
            "bindings": {MEMBER.id: ["member"], ADMIN.id: ["member"]},
        }
    )
    return PolicySet(p.roles, p.bindings, p.settings, break_glass=break_glass)


def facts(**tags: str) -> KeyFacts:
    return KeyFacts("k1", "vault", "dev", tags)


def test_dropping_the_tag_a_deny_rule_selects_is_refused_and_says_why() -> None:
    """Finding 1: {team, class: secret} -> {team} would take the key out of the member's deny rule."""
    refusal = retag_refusal(
        team_policy(), MEMBER, facts(team="payroll", **{"class": "secret"}), facts(team="payroll"), now=NOW
    )

    assert refusal is not None
    assert "would change which of your own rules apply" in refusal
    assert "would stop applying: [member[1] (no-secret)]" in refusal


def test_adding_a_tag_that_widens_the_updaters_own_allow_rule_is_refused() -> None:
    """tier=open would bring the member's own decrypt rule to the key."""
    refusal = retag_refusal(
        team_policy(), MEMBER, facts(team="payroll"), facts(team="payroll", tier="open"), now=NOW
    )

    assert refusal is not None
    assert "would start applying: [member[2]]" in refusal


def test_moving_a_key_out_of_the_updaters_update_rule_is_refused() -> None:
    """key.update is decided on the key as it would be, too."""
    refusal = retag_refusal(team_policy(), MEMBER, facts(team="payroll"), facts(team="other"), now=NOW)

    assert refusal is not None
    assert refusal.startswith("key.update on key k1 as it would be is denied")


def test_a_tag_no_rule_selects_on_changes_freely_and_break_glass_is_unaffected() -> None:
    """Owner tags (no rule selects them) change; the break-glass administrator retags anything;
    rules with no key selector are in both sets, so they never make a difference."""
    p = team_policy(break_glass=frozenset({ADMIN.id}))

    owner = retag_refusal(
        p, MEMBER, facts(team="payroll", owner="a"), facts(team="payroll", owner="b"), now=NOW
    )
    admin = retag_refusal(p, ADMIN, facts(team="payroll", **{"class": "secret"}), facts(), now=NOW)

    assert (owner, admin) == (None, None)
    assert "member[3]" in selecting_rules(p, MEMBER, facts()) & selecting_rules(
        p, MEMBER, facts(team="payroll")
    )


def test_key_service_patch_runs_the_guard_on_the_stored_key_and_keeps_it_on_refusal() -> None:
    """The guard sees the key as stored at write time and its refusal leaves the key as it was."""
    registry = CountingRegistry(active_key())
    keys = KeyService(registry, {})  # type: ignore[arg-type]
    seen: list[tuple[dict[str, str], dict[str, str]]] = []

    def guard(before: Key, after: Key) -> None:
        seen.append((dict(before.tags), dict(after.tags)))
        raise Forbidden("no")

    with pytest.raises(Forbidden):
        asyncio.run(keys.patch("k", {"tags": {"team": "x"}}, guard=guard))

    assert seen == [(dict(active_key().tags), {"team": "x"})]
    assert registry.key.tags == active_key().tags


def test_may_create_some_key_needs_an_allow_rule_without_context() -> None:
    """Finding 6: decided before the body: zero roles, no rule naming key.create, an unconditional
    deny all refuse; a tag-scoped allow may succeed on some key; break-glass always may."""
    p = parse_document(
        {
            "roles": {
                "creator": {"rules": [{"operations": ["key.create"], "keys": {"environment": ["dev"]}}]},
                "reader": {"rules": [{"operations": ["key.read"]}]},
                "blocked": {"rules": [{"operations": ["*"]}, {"effect": "deny", "operations": ["key.*"]}]},
            },
            "bindings": {"cn:c": ["creator"], "cn:r": ["reader"], "cn:b": ["blocked"]},
        }
    )
    p = PolicySet(p.roles, p.bindings, p.settings, break_glass=frozenset({"cn:root"}))

    def may(name: str) -> bool:
        return may_on_some_key(p, Principal("cn", name, f"cn:{name}"), "key.create").allowed

    assert [may(n) for n in ("c", "r", "b", "nobody", "root")] == [True, False, False, False, True]
    assert may_on_some_key(p, Principal("cn", "nobody", "cn:nobody"), "key.create").reason == (
        "key.create is denied: cn:nobody is bound to no role"
    )


@pytest.mark.parametrize("value", ["A" * 900_000, "x\x1b]52;c;eA==\x07", "\u202eevil"])
def test_a_quoted_caller_value_is_short_and_escaped(value: str) -> None:
    """Finding 6: at most 64 characters of the value, every non-printable escaped."""
    quoted = shown(value)

    assert len(quoted) < 100
    assert quoted.isprintable()
    assert quoted.isascii()


@pytest.mark.parametrize("bad", ["ok\x1b[2J", "ok\rSAFE", "ok\x00", "ok\x9b2J", "a\nb", "\u202eevil"])
def test_a_description_must_be_printable_text(bad: str) -> None:
    """Finding 13: C0/C1 controls, ESC, CR, NUL, newline and bidi overrides are refused; the detail
    names the character by code point, never the text."""
    with pytest.raises(BadRequest) as refused:
        schemas.text({"description": bad}, "description", max_length=1024)

    assert "printable" in refused.value.detail
    assert bad not in refused.value.detail
    assert schemas.text({"description": "fine, ünïcode — too"}, "description", max_length=1024)


def test_a_cn_principal_id_must_be_printable() -> None:
    """A cn: grantee is stored and shown: control characters are refused, the value quoted short."""
    with pytest.raises(ValueError, match="is not a principal id") as refused:
        principal_from_id("cn:evil\x1b[2J" + "x" * 5000)

    assert len(str(refused.value)) < 300


def test_a_certificate_cn_must_be_printable() -> None:
    """Sibling of finding 13: a CN with control characters names no principal (401), so no owner,
    binding or record carries one."""
    from broker.errors import Unauthenticated
    from broker.policy.model import principal_from_peercert

    with pytest.raises(Unauthenticated, match="not printable"):
        principal_from_peercert({"subject": ((("commonName", "ops\x1b[2J"),),)}, "keybroker.dev")
