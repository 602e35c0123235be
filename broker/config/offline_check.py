"""``keybroker serve --check-config``: what can be checked about a configuration without its backends.

Everything the broker reads locally at start is read here the same way: the TLS
certificate, key and client CA; the audit HMAC key; the HSM PIN and PKCS#11 library
file; the Vault AppRole files and CA. Vault, KMS and the HSM token are not contacted,
so a passing check says the files are in place, not that the backends will accept them.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path

from broker.config.model import Config
from broker.config.secrets import read_secret_file
from broker.config.tls import server_ssl_context
from broker.errors import ConfigError

# What is checked, and a call that raises ConfigError when it fails (its result is not used).
Check = tuple[str, Callable[[], object]]


def _vault_ca(path: Path | None) -> None:
    if path is None:
        return
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"not a readable PEM CA bundle: {path} ({exc.__class__.__name__})") from None


def _library(path: Path) -> None:
    if not path.is_file():
        raise ConfigError(f"no PKCS#11 library at {path}", key="hsm.library")


def _audit_directory(path: Path) -> None:
    # The broker creates the directory at start if its parent lets it.
    existing = path if path.exists() else path.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{path} cannot be written (nor created)", key="audit.directory")


def _pin(config: Config) -> None:
    if config.hsm.pin_file is not None:
        read_secret_file(config.hsm.pin_file, "hsm.pin_file")
    elif not os.environ.get(config.hsm.pin_env):
        raise ConfigError(f"environment variable {config.hsm.pin_env} is not set", key="hsm.pin_env")


def checks(config: Config) -> list[Check]:
    from broker.api.app import read_hmac_key  # the broker's own reader, so the rules cannot drift

    return [
        ("server TLS certificate, key and client CA", lambda: server_ssl_context(config.server)),
        ("audit HMAC key", lambda: read_hmac_key(config.audit.hmac_key_file)),
        ("audit directory", lambda: _audit_directory(config.audit.directory)),
        ("HSM PKCS#11 library", lambda: _library(config.hsm.library)),
        ("HSM PIN", lambda: _pin(config)),
        ("Vault AppRole role-id", lambda: read_secret_file(config.vault.role_id_file, "vault.role_id_file")),
        (
            "Vault AppRole secret-id",
            lambda: read_secret_file(config.vault.secret_id_file, "vault.secret_id_file"),
        ),
        ("Vault CA bundle", lambda: _vault_ca(config.vault.ca_file)),
    ]


def run_checks(config: Config, out: Callable[[str], None]) -> bool:
    """Run every check, print one line each; True when all pass."""
    ok = True
    for what, check in checks(config):
        try:
            check()
        except ConfigError as exc:
            ok = False
            out(f"FAIL {what}: {exc}")
        else:
            out(f"ok   {what}")
    out(
        "configuration valid (offline: Vault, KMS and the HSM token were not contacted)"
        if ok
        else "configuration NOT usable"
    )
    return ok
