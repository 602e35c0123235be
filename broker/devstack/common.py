"""What every part of the dev stack shares: the state directory's layout, ports, names, errors."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

TRUST_DOMAIN = "keybroker.dev"
HSM_TOKEN_LABEL = "keybroker"  # noqa: S105 - a PKCS#11 token label, not a secret
KMS_REGION = "us-east-1"
# The KMS stand-in accepts any credentials; these never reach real AWS.
DEV_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "keybroker-dev",
    "AWS_SECRET_ACCESS_KEY": "keybroker-dev",
    "AWS_DEFAULT_REGION": KMS_REGION,
}
SOFTHSM_LIBRARIES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
# Client identities issued by the dev stack: file stem → (CN, SPIFFE kind).
DEV_CLIENTS = {"admin": ("admin", "user"), "app": ("app", "app")}
# Their roles in the policy the dev stack stores on first start: (CN, kind, role).
DEV_BINDINGS = (("admin", "user", "administrator"), ("app", "app", "application"))
# Re-issue a certificate that has less than this left.
CERT_RENEW_MARGIN = 7 * 24 * 3600


class StackError(RuntimeError):
    """The stack cannot start; the message says what to do."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """True if a server could listen on 127.0.0.1:port now (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Layout:
    """Every path in the state directory, named once."""

    root: Path

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def kms_state(self) -> Path:
        return self.root / "kms" / "state.pickle"

    @property
    def kms_port_file(self) -> Path:
        return self.root / "kms" / "port"

    @property
    def kms_unseal_key(self) -> Path:
        return self.root / "kms" / "unseal-key-id"

    @property
    def vault_dir(self) -> Path:
        return self.root / "vault"

    @property
    def vault_hcl(self) -> Path:
        return self.vault_dir / "server.hcl"

    @property
    def vault_ports(self) -> Path:
        return self.vault_dir / "ports.json"

    @property
    def vault_audit_log(self) -> Path:
        return self.vault_dir / "audit" / "vault-audit.log"

    @property
    def vault_init(self) -> Path:
        return self.vault_dir / "init.json"

    @property
    def approle_dir(self) -> Path:
        return self.root / "approle"

    @property
    def hsm_dir(self) -> Path:
        return self.root / "hsm"

    @property
    def softhsm_conf(self) -> Path:
        return self.hsm_dir / "softhsm2.conf"

    @property
    def hsm_pin(self) -> Path:
        return self.hsm_dir / "user-pin"

    @property
    def hsm_so_pin(self) -> Path:
        return self.hsm_dir / "so-pin"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def audit_hmac_key(self) -> Path:
        return self.root / "audit-hmac-key"

    @property
    def broker_config(self) -> Path:
        return self.root / "broker.toml"

    @property
    def env_file(self) -> Path:
        return self.root / "env"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: none of the caller's Vault or AWS settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "AWS_"))}
    env.update(DEV_AWS_ENV)
    env.update(extra)
    return env
