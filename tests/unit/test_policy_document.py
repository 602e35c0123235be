"""Policy documents: validation naming line and path, round trips, diffs, the cache failing closed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from broker.errors import Unavailable
from broker.policy.document import (
    PolicyInvalid,
    diff_documents,
    load_file_text,
    parse_document,
    to_document,
)
from broker.policy.model import principal_from_id
from broker.state.policies import BREAK_GLASS_ROLE, PolicyStore, default_policy
from broker.timeutil import parse_duration

SHIPPED = Path(__file__).parents[2] / "config" / "policies.yaml"

BROKEN = """\
version: 1
roles:
  developer:
    rules:
      - operations: [crypto.encrypt, crypto.explode]
        keys: {enviroment: [dev]}
      - operations: [key.read]
        context: {equals: {tenant: "{principal.nmae}"}}
  auditor:
    rules: []
bindings:
  "spiffe://bank.example/user/dana": [developer, ghost]
  "*": [developer]
settings:
  grant_max_expires_in: forever
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyInvalid) as info:
        load_file_text(text, "policies.yaml")
    return [str(p) for p in info.value.problems]


def test_the_shipped_file_is_valid_and_is_what_the_broker_packages() -> None:
    """config/policies.yaml parses, and the packaged default is the same file."""
    shipped = load_file_text(SHIPPED.read_text(), str(SHIPPED))

    assert shipped == default_policy()
    assert sorted(shipped.roles) == sorted(
        [
            "administrator",
            "data-engineer",
            "security-analyst",
            "developer",
            "compliance-officer",
            "application",
        ]
    )


def test_every_problem_is_reported_with_its_line_and_path() -> None:
    """One run lists all problems; each names the line, the path and what was expected."""
    found = problems(BROKEN)

    assert found == [
        "line 5: roles.developer.rules[0].operations[1]: 'crypto.explode' names no operation (known: "
        + found[0].split("(known: ")[1],
        "line 6: roles.developer.rules[0].keys.enviroment: unknown field (expected one of: name, backend, "
        "environment, tags)",
        "line 8: roles.developer.rules[1].context.equals.tenant: unknown template {principal.nmae} (use "
        "{principal.id}, {principal.kind}, {principal.name})",
        "line 10: roles.auditor.rules: expected a non-empty list of rules",
        "line 12: bindings.spiffe://bank.example/user/dana[1]: role 'ghost' is not defined",
        "line 13: bindings.*: binding every principal to a role is refused; name a trust domain or kind",
        "line 15: settings.grant_max_expires_in: expected a duration like 3600, 90m, 24h or 7d",
    ]


def test_yaml_syntax_errors_and_duplicate_keys_name_their_line() -> None:
    """Broken YAML says where; a key given twice is an error, not a silent overwrite."""
    syntax = problems("roles:\n  a: [unclosed\n")
    dupe = problems(
        "roles:\n  a:\n    rules: [{operations: ['*']}]\n  a:\n    rules: [{operations: [key.read]}]\n"
    )

    assert syntax[0].startswith("line 3: (document): not valid YAML")
    assert dupe == ["line 4: roles.a: appears twice in this mapping"]


def test_canonical_document_parses_back_to_the_same_policy() -> None:
    """What Vault stores is exactly what was validated."""
    policy = default_policy()

    assert parse_document(to_document(policy)) == policy


def test_diff_names_roles_rules_bindings_and_settings_that_change() -> None:
    """Added, removed and changed roles with each rule by its name and fields; bindings and settings."""
    old = to_document(default_policy())
    new: dict[str, Any] = to_document(default_policy())
    del new["roles"]["compliance-officer"]
    new["roles"]["auditor"] = {"rules": [{"name": "read-audit", "operations": ["audit.read"]}]}
    new["roles"]["developer"]["rules"][0]["keys"]["environment"] = ["dev"]
    new["bindings"]["cn:dana"] = ["developer"]
    new["settings"]["grant_max_expires_in"] = 3600

    lines = diff_documents(old, new)

    assert lines == [
        "+ role auditor (added, 1 rules)",
        "    + rule auditor/read-audit",
        "    +     operations: [audit.read]",
        "- role compliance-officer (removed)",
        "    - rule compliance-officer/read-and-verify",
        "    -     operations: [key.read, key.list, audit.read, audit.verify, sys.health]",
        "~ role developer (changed)",
        "    ~ rule developer/crypto-dev-staging",
        "          operations: [crypto.*]",
        "          keys:",
        "    -       environment: [dev, staging]",
        "    +       environment: [dev]",
        "+ binding cn:dana: [] -> [developer]",
        "~ setting grant_max_expires_in: 86400 -> 3600",
    ]
    assert diff_documents(old, old) == []


def test_diff_matches_named_rules_by_name_and_unnamed_ones_by_position() -> None:
    """Moving a named rule is an order change, not a remove and an add; a stored invalid role still diffs."""
    old = {"roles": {"app": {"rules": [{"name": "a", "operations": ["key.read"]}, {"operations": ["x"]}]}}}
    moved = {"roles": {"app": {"rules": [{"operations": ["x"]}, {"name": "a", "operations": ["key.read"]}]}}}
    broken = {"roles": {"app": {"rules": "not a list"}}}

    assert diff_documents(
        {
            "roles": {
                "app": {
                    "rules": [{"name": "a", "operations": ["key.read"]}, {"name": "b", "operations": ["x"]}]
                }
            }
        },
        {
            "roles": {
                "app": {
                    "rules": [{"name": "b", "operations": ["x"]}, {"name": "a", "operations": ["key.read"]}]
                }
            }
        },
    ) == ["~ role app (changed)", "    ~ rule order: app/b, app/a"]
    assert "    + rule app[0]" in diff_documents(old, moved)
    assert diff_documents(broken, old)[:2] == ["~ role app (changed)", "    + rule app/a"]


def test_a_rule_name_follows_the_role_name_rule_and_is_unique_in_its_role() -> None:
    """Names label decisions as role/name; a bad, repeated or name-and-id rule is refused with its path."""
    good = parse_document(
        {"roles": {"billing-app": {"rules": [{"name": "read-invoices", "operations": ["key.read"]}]}}}
    )
    with pytest.raises(PolicyInvalid) as bad:
        parse_document(
            {
                "roles": {
                    "r": {
                        "rules": [
                            {"name": "Read Invoices", "operations": ["key.read"]},
                            {"name": "twice", "operations": ["key.read"]},
                            {"name": "twice", "operations": ["key.list"]},
                            {"name": "both", "id": "legacy", "operations": ["key.read"]},
                        ]
                    }
                }
            }
        )

    assert good.roles["billing-app"].rules[0].id == "billing-app/read-invoices"
    assert to_document(good)["roles"]["billing-app"]["rules"][0]["name"] == "read-invoices"
    assert [str(p) for p in bad.value.problems] == [
        "roles.r.rules[0].name: a rule name is 1-63 characters of a-z, 0-9 and '-', starting with a letter",
        "roles.r.rules[2].name: rule name 'r/twice' is used twice in this role",
        "roles.r.rules[3].id: give the rule a name or an id, not both (name is preferred)",
    ]


class FakeVault:
    """Answers the policy store's KV reads from a dict; raising instead when told to (a partition)."""

    def __init__(self) -> None:
        self.document: dict[str, Any] | None = None
        self.version = 0
        self.down = False

    async def request(self, method: str, path: str, body: Any = None, *, what: str) -> dict[str, Any]:
        if self.down:
            raise Unavailable("vault: connection refused")
        if self.document is None:
            from broker.errors import NotFound

            raise NotFound("no such path")
        return {"data": {"data": self.document, "metadata": {"version": self.version}}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def store(vault: FakeVault, clock: Clock, **kw: Any) -> PolicyStore:
    return PolicyStore(vault, "kb-kv", refresh_seconds=2, max_stale_seconds=30, monotonic=clock, **kw)  # type: ignore[arg-type]


def test_no_policy_read_yet_means_every_request_is_refused() -> None:
    """Before the first successful read, current() is a 503, never an empty allow."""
    vault, clock = FakeVault(), Clock()
    vault.down = True
    s = store(vault, clock)

    with pytest.raises(Unavailable, match="has not been read"):
        s.current()
    with pytest.raises(Unavailable):
        asyncio.run(s.load())
    with pytest.raises(Unavailable, match="cannot read it from Vault"):
        s.current()


def test_a_stale_cache_is_refused_and_recovers() -> None:
    """Vault unreachable past max_stale_seconds: 503; the next good read serves again."""
    vault, clock = FakeVault(), Clock()
    vault.document, vault.version = to_document(default_policy()), 4
    s = store(vault, clock)
    asyncio.run(s.load())
    vault.down = True
    clock.now += 29
    with pytest.raises(Unavailable):
        asyncio.run(s.load())
    fresh_enough = s.current().version
    clock.now += 2

    with pytest.raises(
        Unavailable, match=r"31s old \(cannot read it from Vault: vault: connection refused\)"
    ):
        s.current()
    vault.down = False
    asyncio.run(s.load())
    assert (fresh_enough, s.current().version) == (4, 4)


def test_an_invalid_stored_document_leaves_only_break_glass(tmp_path: object) -> None:
    """A document written around the broker's validation is not half-used: nobody is bound to
    anything, health says why, and only the break-glass administrators can act (to repair it)."""
    vault, clock = FakeVault(), Clock()
    vault.document, vault.version = {"roles": {"x": {"rules": [{"operations": ["nope"]}]}}}, 7
    s = store(vault, clock, break_glass=("cn:custodian",))

    snap = asyncio.run(s.load())
    health = asyncio.run(s.health())

    assert (snap.version, snap.effective.roles_of(principal_from_id("cn:someone"))) == (7, ())
    assert snap.effective.roles_of(principal_from_id("cn:custodian")) == (BREAK_GLASS_ROLE,)
    assert health["ok"] is False
    assert "stored document is invalid" in health["error"]


def test_nothing_stored_serves_the_defaults_plus_break_glass_only() -> None:
    """Version 0: the shipped roles, no bindings; the config's administrators hold every right."""
    vault, clock = FakeVault(), Clock()
    s = store(vault, clock, break_glass=("cn:custodian",))
    snap = asyncio.run(s.load())

    assert (snap.version, dict(snap.policy.bindings)) == (0, {})
    assert dict(snap.effective.bindings) == {"cn:custodian": (BREAK_GLASS_ROLE,)}
    assert BREAK_GLASS_ROLE not in snap.policy.roles


@pytest.mark.parametrize(
    "text", ["\u0661\u0662h", "\uff11\uff12h", "12\u00b2", "+12h", "1_2h", "12345678901d"]
)
def test_durations_take_ascii_digits_only(text: str) -> None:
    """A grant's expires_in has one spelling: Arabic-Indic, fullwidth or superscript digits are refused."""
    assert parse_duration(text) is None


def test_a_plain_duration_still_parses() -> None:
    """The ASCII spelling keeps working."""
    assert (parse_duration("12h"), parse_duration("90d"), parse_duration(30)) == (43200, 7776000, 30)
