"""A Vault admin's policy journey with the CLI: show, edit, dry-run diff, apply, explain by rule name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker
from tests.integration.conftest import https
from tests.integration.keyops import create_key
from tests.integration.policyops import fresh


def _show(stack: DevStack, path: Path) -> str:
    shown = keybroker(stack, "policy", "show")
    assert shown.returncode == 0, shown.stderr
    path.write_bytes(shown.stdout)
    return shown.stdout.decode()


def test_policy_show_output_applies_back_unchanged(stack: DevStack, tmp_path: Path) -> None:
    """`policy show > f` then `policy apply f`: the shown document is a valid file with no changes."""
    path = tmp_path / "policy.yaml"
    text = _show(stack, path)
    before = https(stack, "/v1/policies").json()

    dry = keybroker(stack, "policy", "apply", str(path), "--dry-run")
    applied = keybroker(stack, "policy", "apply", str(path))
    after = https(stack, "/v1/policies").json()

    assert text.startswith(f"# keybroker policy document, version {before['version']} ")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.decode().splitlines()[0] == "no changes"
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.decode().strip() == "no changes"
    assert after == before


def test_a_named_rule_is_diffed_applied_and_explained_by_its_name(stack: DevStack, tmp_path: Path) -> None:
    """Edit the shown file: the dry run lists the new role's named rule and fields; explain names it."""
    key = create_key(stack, "vault")
    role = fresh("billing-app")
    principal = f"spiffe://keybroker.dev/app/{fresh('billing')}"
    path = tmp_path / "policy.yaml"
    _show(stack, path)
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    document["roles"][role] = {
        "description": "reads invoices",
        "rules": [{"name": "read-invoices", "operations": ["crypto.decrypt"], "keys": {"name": [key]}}],
    }
    document["bindings"][principal] = [role]
    path.write_text(yaml.safe_dump(document, sort_keys=False))

    dry = keybroker(stack, "policy", "apply", str(path), "--dry-run")
    applied = keybroker(stack, "policy", "apply", str(path))
    allowed = keybroker(
        stack, "policy", "explain", "--principal", principal, "--operation", "crypto.decrypt", "--key", key
    )

    rule = document["roles"][role]["rules"][0]
    rule["operations"].append("crypto.encrypt")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    changed = keybroker(stack, "policy", "apply", str(path), "--dry-run")

    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.decode().splitlines()
    added = lines.index(f"+ role {role} (added, 1 rules)")
    assert lines[added + 1 : added + 6] == [
        "    + description: reads invoices",
        f"    + rule {role}/read-invoices",
        "    +     operations: [crypto.decrypt]",
        "    +     keys:",
        f"    +       name: [{key}]",
    ]
    assert f"+ binding {principal}: [] -> [{role}]" in lines
    assert applied.returncode == 0, applied.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.decode().splitlines()[0] == f"ALLOW  allowed by rule {role}/read-invoices"
    assert changed.stdout.decode().splitlines()[:3] == [
        f"~ role {role} (changed)",
        f"    ~ rule {role}/read-invoices",
        "    -     operations: [crypto.decrypt]",
    ]
    assert "    +     operations: [crypto.decrypt, crypto.encrypt]" in changed.stdout.decode().splitlines()


def test_a_bad_rule_name_is_refused_with_its_line(stack: DevStack, tmp_path: Path) -> None:
    """A rule name breaking the role-name rule: exit 2, the file's line and path, nothing stored."""
    before = https(stack, "/v1/policies").json()
    path = tmp_path / "policy.yaml"
    _show(stack, path)
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    document["roles"][fresh("named")] = {"rules": [{"name": "Read Invoices", "operations": ["key.read"]}]}
    path.write_text(yaml.safe_dump(document, sort_keys=False))

    applied = keybroker(stack, "policy", "apply", str(path))

    assert applied.returncode == 2
    assert "rules[0].name: a rule name is 1-63 characters of a-z, 0-9 and '-', starting with a letter" in (
        applied.stderr.decode()
    )
    assert https(stack, "/v1/policies").json()["version"] == before["version"]
