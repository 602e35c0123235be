"""Policy decisions with 1,000 roles and 10,000 bindings: the binding index finds exactly the roles
a pass over every binding would, while matching only the globs that could apply."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from fnmatch import fnmatchcase

import pytest

from broker.policy import model
from broker.policy.engine import decide
from broker.policy.model import AccessRequest, KeyFacts, PolicySet, Role, Rule, principal_from_id

TD = "spiffe://bank.example"
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def large_policy(roles: int = 1000, bindings: int = 10_000) -> PolicySet:
    """``roles`` roles; ``bindings`` bindings, nine in ten by exact id, the rest globs."""
    role_map = {
        f"r{n}": Role(f"r{n}", (Rule(f"r{n}[0]", ("key.read",), keys=model.KeySelector(names=(f"k{n}-*",))),))
        for n in range(roles)
    }
    table: dict[str, tuple[str, ...]] = {}
    for n in range(bindings):
        if n % 10:
            table[f"{TD}/app/svc{n}"] = (f"r{n % roles}",)
        else:
            table[f"{TD}/team{n}/*"] = (f"r{(n + 1) % roles}",)
    table[f"{TD}/*/shared"] = ("r7",)
    return PolicySet(role_map, table)


def naive_roles(policy: PolicySet, principal_id: str) -> tuple[str, ...]:
    found: set[str] = set()
    for pattern, names in policy.bindings.items():
        if pattern == principal_id or (
            any(c in pattern for c in "*?[") and fnmatchcase(principal_id, pattern)
        ):
            found.update(names)
    return tuple(sorted(found))


def test_index_finds_the_same_roles_as_a_full_pass() -> None:
    """Exact ids, glob-bound ids, ids bound both ways, unbound ids and tricky glob syntax agree."""
    rng = random.Random(14)
    policy = large_policy()
    extra = {
        f"{TD}/app/[ab]x": ("r1",),
        f"{TD}/app/a[x": ("r2",),  # an unclosed bracket is a literal '['
        "*": ("r3",),
        f"{TD}/app/svc1?": ("r4",),
    }
    policy = PolicySet(policy.roles, {**policy.bindings, **extra})
    ids = [f"{TD}/app/svc{rng.randrange(20_000)}" for _ in range(60)]
    ids += [f"{TD}/team{n}/x" for n in range(0, 10_000, 370)]
    ids += [f"{TD}/app/ax", f"{TD}/app/a[x", f"{TD}/app/shared", f"{TD}/app/svc12", "", "x"]
    for principal_id in ids:
        assert policy._binding_index.roles_of(principal_id) == naive_roles(policy, principal_id), principal_id


def test_a_decision_matches_few_globs(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 1,000 glob bindings among 10,000, one decision tries only the globs whose literal prefix
    the caller's id starts with, not all of them; and decides as the bindings say."""
    policy = large_policy()
    calls = 0

    def counting(name: str, pattern: str) -> bool:
        nonlocal calls
        calls += 1
        return fnmatchcase(name, pattern)

    monkeypatch.setattr(model, "fnmatchcase", counting)
    bound_by_glob = principal_from_id(f"{TD}/team20/alice")
    ask = AccessRequest(bound_by_glob, "key.read", KeyFacts("k21-a", "vault", "dev", {}))
    assert decide(policy, ask, now=NOW).allowed
    assert calls <= 5, calls
    calls = 0
    exact = principal_from_id(f"{TD}/app/svc11")
    assert decide(
        policy, AccessRequest(exact, "key.read", KeyFacts("k11-a", "vault", "dev", {})), now=NOW
    ).allowed
    assert not decide(
        policy, AccessRequest(exact, "key.read", KeyFacts("k12-a", "vault", "dev", {})), now=NOW
    ).allowed
    assert calls <= 5, calls
