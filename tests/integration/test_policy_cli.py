"""Policies, bindings and grants from the command line, as a custodian and an application do it."""

from __future__ import annotations

import json
from pathlib import Path

from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker
from tests.integration.conftest import https
from tests.integration.keyops import create_key, unique
from tests.integration.policyops import fresh, identity


def test_an_invalid_policy_file_changes_nothing(stack: DevStack, tmp_path: Path) -> None:
    """Each problem is printed with file and line (or as a stored binding's), exit 2, nothing stored."""
    before = https(stack, "/v1/policies").json()
    bad = tmp_path / "policies.yaml"
    role = fresh("valid-role")
    bad.write_text(
        "roles:\n"
        f"  {role}:\n"
        "    rules:\n"
        "      - operations: [key.read]\n"
        "  broken:\n"
        "    rules:\n"
        "      - operations: [crypto.encrypt]\n"
        "        keys: {environment: [qa]}\n"
        "bindings: {}\n"
    )
    drops_role = tmp_path / "drops.yaml"
    drops_role.write_text(f"roles:\n  {role}:\n    rules: [{{operations: [key.read]}}]\n")

    applied = keybroker(stack, "policy", "apply", str(bad))
    dropped = keybroker(stack, "policy", "apply", str(drops_role))
    after = https(stack, "/v1/policies").json()

    assert applied.returncode == 2
    assert applied.stderr.decode().splitlines() == [
        f"keybroker: {bad} is invalid; nothing was applied:",
        f"  {bad}:line 8: roles.broken.rules[0].keys.environment: 'qa' is not one of dev, staging, prod",
    ]
    assert dropped.returncode == 2
    assert (
        "  stored bindings.spiffe://keybroker.dev/app/app[0]: role 'application' is not defined (the file "
        "has no bindings section, so the stored bindings are kept and must fit its roles: keep the role, "
        "change the binding first, or put the bindings you want in the file)"
    ) in dropped.stderr.decode().splitlines()
    assert after == before


def test_dry_run_shows_the_diff_then_apply_stores_it(stack: DevStack, tmp_path: Path) -> None:
    """--dry-run prints what would change and changes nothing; apply stores it and keeps the bindings."""
    current = https(stack, "/v1/policies").json()
    document = current["document"]
    role = fresh("auditor-lite")
    document["roles"][role] = {"description": "reads audit", "rules": [{"operations": ["audit.read"]}]}
    del document["bindings"]
    path = tmp_path / "policies.json"
    path.write_text(json.dumps(document))

    dry = keybroker(stack, "policy", "apply", str(path), "--dry-run")
    unchanged = https(stack, "/v1/policies").json()
    applied = keybroker(stack, "policy", "apply", str(path))
    after = https(stack, "/v1/policies").json()
    shown = keybroker(stack, "policy", "show", role)
    listed = keybroker(stack, "policy", "list")

    assert dry.returncode == 0, dry.stderr
    assert f"+ role {role} (added, 1 rules)" in dry.stdout.decode()
    assert f"(dry run: the stored document stays at version {current['version']})" in dry.stdout.decode()
    assert unchanged["version"] == current["version"]
    assert applied.returncode == 0, applied.stderr
    assert after["version"] > current["version"]
    assert after["document"]["roles"][role]["rules"] == [{"operations": ["audit.read"]}]
    assert after["document"]["bindings"] == unchanged["document"]["bindings"]
    assert "- operations: [audit.read]" in shown.stdout.decode()
    assert role in listed.stdout.decode()


def test_explain_bindings_and_grants_from_the_cli(stack: DevStack) -> None:
    """bindings set → explain says ALLOW with the rule; grants create → the grantee uses and retires it."""
    stem, principal = identity(stack, fresh("cli-dev"))
    key = create_key(stack, "vault", environment="prod")

    bound = keybroker(stack, "bindings", "set", principal, "developer")
    shown = keybroker(stack, "bindings", "show")
    deny = keybroker(
        stack, "policy", "explain", "--principal", principal, "--operation", "crypto.decrypt", "--key", key
    )
    granted = keybroker(
        stack, "grants", "create", key, "--grantee", principal, "--operation", "crypto.encrypt",
        "--context-equals", "tenant=acme", "--expires-in", "10m", "--json",
    )  # fmt: skip
    grant = json.loads(granted.stdout)
    allow = keybroker(
        stack, "policy", "explain", "--principal", principal, "--operation", "crypto.encrypt", "--key", key,
        "--context", "tenant=acme",
    )  # fmt: skip
    used = keybroker(stack, "keys", "encrypt", key, "--context", "tenant=acme", stdin=b"x", who=stem)
    listed = keybroker(stack, "grants", "list", key)
    retired = keybroker(stack, "grants", "retire", "--token", grant["grant_token"], who=stem)
    after = keybroker(stack, "keys", "encrypt", key, "--context", "tenant=acme", stdin=b"x", who=stem)
    unbound = keybroker(stack, "bindings", "set", principal)

    assert bound.returncode == 0, bound.stderr
    assert f"{principal}  developer" in shown.stdout.decode()
    assert deny.returncode == 1
    assert deny.stdout.decode().splitlines()[0] == (
        f"DENY  crypto.decrypt on key {key} is denied: no rule of the roles (developer) allows it"
    )
    assert (
        "not matched: developer/crypto-dev-staging: environment prod is not one of [dev, staging]"
        in deny.stdout.decode()
    )
    assert allow.returncode == 0
    assert f"decided by grant {grant['grant_id']}" in allow.stdout.decode()
    assert used.returncode == 0, used.stderr
    assert grant["grant_id"] in listed.stdout.decode()
    assert retired.returncode == 0, retired.stderr
    assert (after.returncode, b"403 forbidden" in after.stderr) == (1, True)
    assert unbound.returncode == 0
    assert principal not in https(stack, "/v1/bindings").json()["bindings"]


def test_cli_refuses_bad_input_clearly(stack: DevStack, tmp_path: Path) -> None:
    """A missing file, an unknown operation, a bad token: one readable line each, never a traceback."""
    missing = keybroker(stack, "policy", "apply", str(tmp_path / "nope.yaml"))
    bad_op = keybroker(stack, "policy", "explain", "--principal", "cn:x", "--operation", "crypto.explode")
    bad_token = keybroker(stack, "grants", "retire", "--token", "not-a-token")
    absent_key = keybroker(stack, "grants", "list", unique("absent"))

    assert (missing.returncode, b"No such file or directory" in missing.stderr) == (2, True)
    assert bad_op.returncode == 2
    assert b"invalid choice" in bad_op.stderr
    assert (bad_token.returncode, b"--token: not a grant token" in bad_token.stderr) == (2, True)
    assert (absent_key.returncode, b"404 not_found" in absent_key.stderr) == (1, True)
    assert b"Traceback" not in missing.stderr + bad_op.stderr + bad_token.stderr + absent_key.stderr
