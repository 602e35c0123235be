"""The stack comes up real: Vault auto-unsealed by KMS, KMS and the HSM reachable."""

from __future__ import annotations

import json
import stat
import urllib.request

from broker.devstack.stack import DevStack
from tests.integration.conftest import https, wait_until_healthy


def test_health_reports_every_component(stack: DevStack) -> None:
    """200 with Vault unsealed by awskms, KMS ok, HSM logged in, audit sink writable."""
    reply = https(stack, "/v1/sys/health")

    body = reply.json()
    assert reply.status == 200
    assert body["status"] == "ok"
    assert body["vault"]["seal_type"] == "awskms"
    assert body["vault"]["sealed"] is False
    assert body["vault"]["initialized"] is True
    assert body["vault"]["is_leader"] is True
    assert body["vault"]["auth"] == "ok"
    assert body["kms"]["ok"] is True
    assert body["hsm"] == {
        "ok": True,
        "token_label": "keybroker",
        "logged_in": True,
        "sessions": 2,
        "os_locking": True,
    }
    assert body["audit"]["ok"] is True


def test_vault_restart_unseals_through_kms_alone(stack: DevStack) -> None:
    """Restarted Vault is unsealed by the KMS seal; no recovery key is ever submitted."""
    init = json.loads(stack.layout.vault_init.read_text())

    stack.restart_vault()

    with urllib.request.urlopen(f"{stack.vault_addr}/v1/sys/seal-status", timeout=5) as resp:
        status = json.load(resp)
    assert status["sealed"] is False
    assert status["type"] == "awskms"
    assert status["recovery_seal"] is True
    assert status["progress"] == 0  # no unseal share was ever entered
    # The broker keeps serving on the restarted Vault (its token lives in raft storage).
    assert wait_until_healthy(stack).json()["vault"]["sealed"] is False
    assert len(init["recovery_keys_b64"]) == 5


def test_kms_down_makes_health_503_and_recovers(stack: DevStack) -> None:
    """Fail closed: an unreachable KMS is reported (503); a restarted KMS has kept its keys."""
    stack.children.pop("kms").stop()
    try:
        reply = https(stack, "/v1/sys/health")

        assert reply.status == 503
        assert reply.json()["kms"]["ok"] is False
        assert reply.json()["vault"]["ok"] is True
    finally:
        stack.start_kms()
    assert wait_until_healthy(stack).status == 200
    key_id = stack.layout.kms_unseal_key.read_text().strip()
    assert stack.kms_client().describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"


def test_audit_directory_gone_makes_health_503(stack: DevStack) -> None:
    """An audit sink that cannot be written is reported; health is 503 until it can."""
    audit = stack.layout.audit_dir
    moved = audit.with_name("audit.moved")
    audit.rename(moved)
    try:
        reply = https(stack, "/v1/sys/health")

        assert reply.status == 503
        assert reply.json()["audit"]["ok"] is False
    finally:
        moved.rename(audit)


def test_secret_files_are_owner_only(stack: DevStack) -> None:
    """Recovery keys, AppRole credentials, HSM PINs and private keys are mode 0600."""
    layout = stack.layout
    secret_files = [
        layout.vault_init,
        layout.approle_dir / "role-id",
        layout.approle_dir / "secret-id",
        layout.hsm_pin,
        layout.hsm_so_pin,
        layout.tls / "admin.key",
        layout.tls / "server.key",
        layout.kms_state,
    ]

    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in secret_files}

    assert modes == {p.name: 0o600 for p in secret_files}


def test_sealed_vault_makes_health_503_until_kms_unseals_it(stack: DevStack) -> None:
    """Fail closed on a sealed Vault; a restart brings it back through the KMS seal alone."""
    stack.vault_client().sys.seal()
    try:
        reply = https(stack, "/v1/sys/health")

        assert reply.status == 503
        assert reply.json()["vault"]["sealed"] is True
        assert reply.json()["vault"]["ok"] is False
    finally:
        stack.restart_vault()
    reply = wait_until_healthy(stack)

    assert reply.status == 200
    assert reply.json()["vault"]["sealed"] is False
