"""The operator CLI refuses to send Vault's root token over plain http to another host."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.cli import EXIT_USAGE, main


@pytest.mark.parametrize(
    "address", ["http://vault.internal:8200", "http://10.0.0.5:8200", "ftp://vault:8200"]
)
def test_vault_bootstrap_refuses_plain_http_to_a_remote_vault(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before any connection: exit 2 with a message naming the address and https."""
    code = main(["vault", "bootstrap", "--address", address, "--approle-dir", str(tmp_path)])

    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"refusing plain http to {address}" in err
    assert "https://" in err
    assert list(tmp_path.iterdir()) == []
