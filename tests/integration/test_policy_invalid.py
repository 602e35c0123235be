"""A policy document stored invalid (written straight into Vault): the cause is visible everywhere,
and repairing it with `keybroker policy apply` keeps every binding — tried as the user does it."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker
from tests.integration.conftest import https
from tests.integration.keyops import b64, create_key
from tests.integration.test_policy_races import KV, stored_document


def _write_raw(stack: DevStack, document: dict[str, Any]) -> None:
    stack.vault_client().secrets.kv.v2.create_or_update_secret(
        path="policy/document", secret=document, mount_point=KV
    )


def _wait_policy(stack: DevStack, *, healthy: bool) -> None:
    """Until the stack's broker has re-read the document and its health says it is (in)valid (bounded)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = https(stack, "/v1/sys/health").json()["policy"]
        if health.get("version") == stored_document(stack)[1] and health["ok"] == healthy:
            return
        time.sleep(0.2)
    raise AssertionError(f"the broker did not see the policy become {'valid' if healthy else 'invalid'}")


@pytest.fixture
def good(stack: DevStack) -> Iterator[dict[str, Any]]:
    """The valid stored document; stored again (through Vault) after the test, whatever happened."""
    document, _ = stored_document(stack)
    yield copy.deepcopy(document)
    _write_raw(stack, document)
    _wait_policy(stack, healthy=True)


def _broken(good: dict[str, Any]) -> dict[str, Any]:
    """The valid document with one role misspelt, as a hasty edit in Vault's UI would leave it."""
    bad = copy.deepcopy(good)
    bad["roles"]["broken"] = {"rules": [{"operations": ["crypto.encrypt"], "keys": {"enviroment": ["dev"]}}]}
    return bad


def test_repairing_an_invalid_policy_with_the_cli_keeps_every_binding(
    stack: DevStack, good: dict[str, Any], tmp_path: Path
) -> None:
    """With an invalid document stored, `policy apply mine.yaml --dry-run` (no bindings in the file)
    diffs against what is stored and warns that it is invalid; the real apply keeps every stored
    binding, and the application works again. A file whose bindings drop one says so plainly."""
    key = create_key(stack, "vault", tags={"app": "app"})  # the application role's own kind of key
    _write_raw(stack, _broken(good))
    _wait_policy(stack, healthy=False)
    mine = tmp_path / "mine.yaml"
    roles = {**good["roles"], "billing-app": {"rules": [{"operations": ["crypto.encrypt"]}]}}
    mine.write_text(yaml.safe_dump({"roles": roles, "settings": good["settings"]}))
    dropping = tmp_path / "dropping.yaml"
    app = "spiffe://keybroker.dev/app/app"
    others = {p: r for p, r in good["bindings"].items() if p != app}
    dropping.write_text(yaml.safe_dump({"roles": roles, "bindings": others}))

    dry = keybroker(stack, "policy", "apply", str(mine), "--dry-run")
    dry_drop = keybroker(stack, "policy", "apply", str(dropping), "--dry-run")
    unchanged = stored_document(stack)[0]
    applied = keybroker(stack, "policy", "apply", str(mine))
    after, _ = stored_document(stack)
    body = {"plaintext": b64(b"x"), "context": {}}
    works = https(stack, f"/v1/keys/{key}/encrypt", who="app", body=body)

    assert dry.returncode == 0, dry.stderr
    assert "WARNING: the stored policy document (version" in dry.stderr.decode()
    assert "is INVALID" in dry.stderr.decode()
    assert "roles.broken.rules[0].keys.enviroment: unknown field" in dry.stderr.decode()
    roles_changed = [line for line in dry.stdout.decode().splitlines() if " role " in line]
    assert roles_changed == ["+ role billing-app (added, 1 rules)", "- role broken (removed)"]
    assert "binding" not in dry.stdout.decode()
    assert dry_drop.returncode == 0, dry_drop.stderr
    assert "- binding spiffe://keybroker.dev/app/app: [application] -> []" in dry_drop.stdout.decode()
    assert "WARNING: this drops 1 stored binding(s): spiffe://keybroker.dev/app/app loses application" in (
        dry_drop.stdout.decode()
    )
    assert unchanged == _broken(good)
    assert applied.returncode == 0, applied.stderr
    assert after["bindings"] == good["bindings"]
    assert "billing-app" in after["roles"]
    assert works.status == 200, works.body


def test_unreadable_stored_bindings_are_never_silently_replaced(
    stack: DevStack, good: dict[str, Any], tmp_path: Path
) -> None:
    """Stored bindings that are not even a mapping cannot be kept: the CLI and the API refuse a
    bindings-less document and say how to proceed; nothing is written."""
    bad = {**good, "bindings": "spiffe://keybroker.dev/app/app=application"}
    _write_raw(stack, bad)
    _wait_policy(stack, healthy=False)
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"roles": good["roles"]}))

    cli = keybroker(stack, "policy", "apply", str(mine))
    api = https(stack, "/v1/policies", method="PUT", body={"document": {"roles": good["roles"]}})

    assert cli.returncode == 2
    assert "bindings cannot be read" in cli.stderr.decode()
    assert "Add a `bindings:` section" in cli.stderr.decode()
    assert (api.status, api.json()["code"]) == (409, "conflict")
    assert "send the bindings you want" in api.json()["detail"]
    assert stored_document(stack)[0] == bad


def test_an_invalid_stored_policy_is_named_as_the_cause_everywhere(
    stack: DevStack, good: dict[str, Any]
) -> None:
    """Applications get 503 policy_invalid (not 403), the audit record says why, `policy list` and
    `bindings show` warn that nothing is in force, and `policy explain` names the invalid policy
    instead of "bound to no role"."""
    key = create_key(stack, "vault", tags={"app": "app"})  # the application role's own kind of key
    _write_raw(stack, _broken(good))
    _wait_policy(stack, healthy=False)

    refused = https(stack, f"/v1/keys/{key}/encrypt", who="app", body={"plaintext": b64(b"x"), "context": {}})
    listed = keybroker(stack, "policy", "list")
    shown = keybroker(stack, "bindings", "show")
    explained = keybroker(
        stack, "policy", "explain", "--principal", "spiffe://keybroker.dev/app/app",
        "--operation", "crypto.encrypt", "--key", key,
    )  # fmt: skip
    explained_json = json.loads(
        keybroker(
            stack, "policy", "explain", "--principal", "spiffe://keybroker.dev/app/app",
            "--operation", "crypto.encrypt", "--key", key, "--json",
        ).stdout
    )  # fmt: skip
    rows = https(stack, f"/v1/audit/events?key={key}").json()["events"]
    record = [
        r for r in rows if r.get("status") == 503 and r.get("principal") == "spiffe://keybroker.dev/app/app"
    ]

    assert (refused.status, refused.json()["code"]) == (503, "policy_invalid")
    # Only an administrator's repair ends it: clients are not told to come back in 2 s.
    assert "Retry-After" not in refused.headers
    assert "bound to no role" not in refused.body.decode()
    for out in (listed, shown):
        assert out.returncode == 0, out.stderr
        assert "WARNING: the stored policy document" in out.stderr.decode()
        assert "roles.broken.rules[0].keys.enviroment" in out.stderr.decode()
    assert "INVALID: not in force" in listed.stdout.decode()
    assert ["spiffe://keybroker.dev/app/app", "application"] in [
        r.split() for r in shown.stdout.decode().splitlines()
    ]
    assert "INVALID: these bindings are NOT in force" in shown.stdout.decode()
    assert explained.returncode == 1
    assert explained.stdout.decode().startswith("DENY  policy_invalid: the stored document is invalid")
    assert "bound to no role" not in explained.stdout.decode()
    assert explained_json["policy_invalid"].startswith("the stored document is invalid")
    assert len(record) == 1, rows
    assert record[0]["decision"]["reason"].startswith("policy_invalid: the stored document is invalid")
    assert record[0]["decision"]["allowed"] is False
