"""The whole key lifecycle from the command line, against the running stack, as a custodian does it."""

from __future__ import annotations

import json

from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker
from tests.integration.keyops import unique


def test_lifecycle_from_the_cli(stack: DevStack) -> None:
    """create → encrypt → rotate → rewrap → decrypt → suspend → destroy schedule, all by command."""
    name = unique("cli")

    created = keybroker(
        stack, "keys", "create", name, "--backend", "kms", "--environment", "staging", "--json"
    )
    sealed = keybroker(stack, "keys", "encrypt", name, "--context", "tenant=acme", stdin=b"card 4111")
    rotated = keybroker(stack, "keys", "rotate", name, "--json")
    rewrapped = keybroker(stack, "keys", "rewrap", name, "--context", "tenant=acme", stdin=sealed.stdout)
    opened = keybroker(stack, "keys", "decrypt", name, "--context", "tenant=acme", stdin=rewrapped.stdout)
    wrong = keybroker(stack, "keys", "decrypt", name, "--context", "tenant=evil", stdin=rewrapped.stdout)
    suspended = keybroker(stack, "keys", "suspend", name)
    refused = keybroker(stack, "keys", "encrypt", name, stdin=b"x")
    protected = keybroker(stack, "keys", "schedule-destruction", name, "--pending-days", "7")
    keybroker(stack, "keys", "update", name, "--deletion-protection", "off")
    scheduled = keybroker(stack, "keys", "schedule-destruction", name, "--pending-days", "7", "--json")
    listed = keybroker(stack, "keys", "list", "--state", "pending-destruction")

    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["state"] == "active"
    assert sealed.stdout.decode().startswith(f"kb1:{name}:1:")
    assert json.loads(rotated.stdout)["latest_version"] == 2
    assert rewrapped.stdout.decode().startswith(f"kb1:{name}:2:")
    assert opened.stdout == b"card 4111"
    assert (wrong.returncode, b"decryption_failed" in wrong.stderr) == (1, True)
    assert b"state                suspended" in suspended.stdout
    assert (refused.returncode, b"409 conflict" in refused.stderr) == (1, True)
    assert b"deletion protection on" in protected.stderr
    assert json.loads(scheduled.stdout)["state"] == "pending-destruction"
    assert name in listed.stdout.decode()
    assert b"Traceback" not in b"".join(p.stderr for p in (wrong, refused, protected))


def test_cli_errors_are_one_line_without_traceback(stack: DevStack) -> None:
    """Bad input gives a readable message and a non-zero status, never a traceback."""
    missing = keybroker(stack, "keys", "show", unique("absent"))
    bad_context = keybroker(stack, "keys", "encrypt", "whatever", "--context", "novalue", stdin=b"x")

    assert (missing.returncode, b"404 not_found" in missing.stderr) == (1, True)
    assert bad_context.returncode == 2
    assert b"--context takes KEY=VALUE" in bad_context.stderr
    assert b"Traceback" not in missing.stderr + bad_context.stderr


def test_the_dev_application_uses_only_keys_tagged_for_it(stack: DevStack) -> None:
    """The dev app certificate holds the application role: crypto on keys tagged app=app, no management."""
    mine, other = unique("authz"), unique("authz")
    keybroker(stack, "keys", "create", mine, "--backend", "vault", "--environment", "dev", "--tag", "app=app")
    keybroker(stack, "keys", "create", other, "--backend", "vault", "--environment", "dev")

    create = keybroker(
        stack, "keys", "create", unique("nope"), "--backend", "vault", "--environment", "dev", who="app"
    )
    rotate = keybroker(stack, "keys", "rotate", mine, who="app")
    sealed = keybroker(stack, "keys", "encrypt", mine, stdin=b"app data", who="app")
    foreign = keybroker(stack, "keys", "encrypt", other, stdin=b"app data", who="app")

    assert (create.returncode, b"403 forbidden" in create.stderr) == (1, True)
    assert b"key.rotate on key" in rotate.stderr
    assert b"no rule of the roles (application) allows it" in rotate.stderr
    assert sealed.returncode == 0
    assert sealed.stdout.startswith(f"kb1:{mine}:1:".encode())
    assert foreign.stderr.startswith(
        b"keybroker: error: 403 forbidden: crypto.encrypt on key " + other.encode()
    )
    assert b" is denied (request " in foreign.stderr
