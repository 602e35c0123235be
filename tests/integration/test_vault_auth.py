"""The broker's Vault identity: AppRole login, renewal and re-login past the max TTL;
and a bootstrap that is safe to run again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from broker.cli import main
from broker.devstack.stack import DevStack
from broker.vaultops.bootstrap import BootstrapOptions, bootstrap
from tests.integration.conftest import extra_broker, https


def test_broker_keeps_working_past_token_ttl(stack: DevStack, tmp_path: Path) -> None:
    """With a 3 s token TTL and 7 s max TTL, 16 s of calls all succeed: renewals, then re-logins."""
    approle = tmp_path / "approle"
    bootstrap(
        BootstrapOptions(
            address=stack.vault_addr,
            approle_dir=approle,
            token=stack.root_token(),
            role_name="kb-short-ttl",
            token_ttl="3s",
            token_max_ttl="7s",
        )
    )
    with extra_broker(stack, tmp_path, "broker-short-ttl", approle_dir=approle) as broker:
        url, child = broker.url, broker.child
        statuses = []
        started = time.monotonic()
        while time.monotonic() - started < 16:
            statuses.append(https(stack, "/v1/sys/health", url=url).status)
            time.sleep(0.5)

    events = [json.loads(line).get("event") for line in child.log_path.read_text().splitlines()]
    assert set(statuses) == {200}
    assert events.count("vault_token_renewed") >= 2
    assert events.count("vault_login") >= 3  # first login plus at least one per 7 s max TTL


def test_bootstrap_twice_changes_nothing_but_roles(stack: DevStack) -> None:
    """A second run finds everything in place and keeps the broker's secret id."""
    secret_before = (stack.layout.approle_dir / "secret-id").read_text()

    result = bootstrap(
        BootstrapOptions(
            address=stack.vault_addr, approle_dir=stack.layout.approle_dir, token=stack.root_token()
        )
    )

    assert result.initialized_now is False
    assert result.changed == ["pki roles (written every run)"]
    assert "initialize" in result.unchanged
    assert "broker policy" in result.unchanged
    assert "audited header" in result.unchanged
    assert (stack.layout.approle_dir / "secret-id").read_text() == secret_before


def test_bootstrap_of_initialised_vault_without_token_is_refused(
    stack: DevStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI says what is missing, exits 1, and prints no traceback."""
    for name in ("VAULT_TOKEN", "BAO_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    code = main(["vault", "bootstrap", "--address", stack.vault_addr, "--approle-dir", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 1
    assert "already initialised: give an operator token with --token-file" in err
    assert "Traceback" not in err


def test_bootstrap_with_a_bad_token_is_refused(
    stack: DevStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong operator token is named as the problem."""
    token_file = tmp_path / "token"
    token_file.write_text("s.not-a-real-token\n")

    code = main(
        [
            "vault",
            "bootstrap",
            "--address",
            stack.vault_addr,
            "--approle-dir",
            str(tmp_path),
            "--token-file",
            str(token_file),
        ]
    )

    assert code == 1
    assert "operator token was refused" in capsys.readouterr().err


def test_no_secret_reaches_any_log(stack: DevStack) -> None:
    """Root token, recovery keys, AppRole secret id, HSM PINs and private keys appear in no log."""
    layout = stack.layout
    init = json.loads(layout.vault_init.read_text())
    secrets = {
        "root token": init["root_token"],
        "secret id": (layout.approle_dir / "secret-id").read_text().strip(),
        "hsm pin": layout.hsm_pin.read_text().strip(),
        "hsm so pin": layout.hsm_so_pin.read_text().strip(),
        **{f"recovery key {i}": key for i, key in enumerate(init["recovery_keys_b64"])},
    }
    for name in ("admin", "app", "server"):
        key_lines = (layout.tls / f"{name}.key").read_text().splitlines()
        secrets[f"{name} private key"] = max(key_lines[1:-1], key=len)
    logs = [*sorted(layout.logs.glob("*.log")), layout.vault_audit_log]
    https(stack, "/v1/sys/health")

    leaks = [
        f"{what} in {log.name}"
        for log in logs
        for what, value in secrets.items()
        if value and value in log.read_text(errors="replace")
    ]

    assert len(logs) >= 4
    assert leaks == []
