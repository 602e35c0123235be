"""TLS files named in settings: a missing, unreadable or misplaced file is a ConfigError naming the
setting, never a traceback (serve --check-config and start-up print it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config.tls import client_ssl_context
from broker.errors import ConfigError


@pytest.mark.parametrize("kind", ["missing", "directory", "not-pem"])
def test_a_bad_ca_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    """A CA path that does not exist, is a directory, or holds no PEM: one clear error."""
    ca = tmp_path / "ca.pem"
    if kind == "directory":
        ca.mkdir()
    elif kind == "not-pem":
        ca.write_text("hello\n")
    with pytest.raises(ConfigError):
        client_ssl_context(ca, tmp_path / "me.crt", tmp_path / "me.key")
