"""The broker of the dev stack: its config (one audit log per replica), process, health and env file."""

from __future__ import annotations

import os
import shlex
import ssl
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from broker._files import write_private
from broker.devstack.common import HSM_TOKEN_LABEL, KMS_REGION, TRUST_DOMAIN, Layout, child_env
from broker.devstack.hsm import find_softhsm_library
from broker.devstack.kms import DevKms
from broker.devstack.processes import Child, spawn, wait_until
from broker.devstack.vault import DevVault


class DevBroker:
    """Broker processes on ``port`` (the main one) or another port (a replica)."""

    def __init__(
        self,
        layout: Layout,
        vault: DevVault,
        kms: DevKms,
        *,
        port: int,
        env: dict[str, str],
        cluster: Sequence[DevVault] = (),
    ) -> None:
        self.layout = layout
        self._vault = vault
        # Every node of a raft cluster: the broker is given all their addresses and fails over.
        self._cluster = cluster
        self._kms = kms
        self.port = port
        self.env = env

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def render_config(
        self,
        *,
        port: int | None = None,
        approle_dir: Path | None = None,
        node: str | None = None,
        audit_dir: Path | None = None,
    ) -> str:
        """The broker's config; another port is another replica, with its own audit log (one chain each)."""
        tls = self.layout.tls
        approle = approle_dir or self.layout.approle_dir
        port = port or self.port
        replica = port != self.port
        if audit_dir is None:
            audit_dir = self.layout.audit_dir.with_name(f"audit-{port}") if replica else self.layout.audit_dir
        if node is None:
            node = f"broker-{port}" if replica else "broker"
        addresses = ""
        if self._cluster:
            listed = ", ".join(f'"{n.broker_addr}"' for n in self._cluster)
            addresses = f"\naddresses = [{listed}]"
        if not self.layout.audit_hmac_key.is_file():
            write_private(self.layout.audit_hmac_key, os.urandom(32).hex() + "\n")
        return f"""\
# Written by `keybroker dev`; regenerated on every start.
[server]
host = "127.0.0.1"
port = {port}
cert_file = "{tls / "server.crt"}"
key_file = "{tls / "server.key"}"
client_ca_file = "{tls / "ca.pem"}"
trust_domain = "{TRUST_DOMAIN}"
administrators = ["spiffe://{TRUST_DOMAIN}/user/admin"]
# A revocation shows within seconds on the dev stack (production default: 30 s).
crl_refresh_seconds = 2.0

[vault]
address = "{self._vault.broker_addr}"{addresses}{self._vault.broker_config_lines}
role_id_file = "{approle / "role-id"}"
secret_id_file = "{approle / "secret-id"}"

[kms]
region = "{KMS_REGION}"
endpoint = "{self._kms.endpoint}"
# The moto stand-in speaks plain http, on loopback only; production KMS is https.
allow_insecure_http = true

[hsm]
library = "{find_softhsm_library()}"
token_label = "{HSM_TOKEN_LABEL}"
pin_file = "{self.layout.hsm_pin}"

[audit]
directory = "{audit_dir}"
node = "{node}"
hmac_key_file = "{self.layout.audit_hmac_key}"
vault_audit_log = "{self.layout.vault_audit_log}"
"""

    def spawn(self, name: str, config: Path, **env: str) -> Child:
        return spawn(
            name,
            [sys.executable, "-m", "broker", "serve", "--config", str(config)],
            log_path=self.layout.logs / f"{name}.log",
            env=child_env(SOFTHSM2_CONF=str(self.layout.softhsm_conf), **self.env, **env),
        )

    def client_ssl(self, who: str = "admin") -> ssl.SSLContext:
        from broker.config.tls import client_ssl_context

        tls = self.layout.tls
        return client_ssl_context(tls / "ca.pem", tls / f"{who}.crt", tls / f"{who}.key")

    def wait_healthy(self, child: Child, url: str, timeout: float = 60) -> None:
        ctx = self.client_ssl()

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/v1/sys/health", context=ctx, timeout=5) as resp:  # noqa: S310 - https URL we built
                    return bool(resp.status == 200)
            except (OSError, ValueError):
                return False

        wait_until(child, healthy, timeout=timeout, what="healthy", interval=0.2)

    def write_env_file(self, urls: Sequence[str] = ()) -> None:
        """``. <state>/env`` points the CLI, curl, bao and the AWS tools at this stack.

        ``KEYBROKER_ADDR`` lists every broker replica, comma-separated (clients fail over).
        """
        tls = self.layout.tls
        lines = {
            "KEYBROKER_ADDR": ",".join(urls or [self.url]),
            "KEYBROKER_CACERT": tls / "ca.pem",
            "KEYBROKER_CLIENT_CERT": tls / "admin.crt",
            "KEYBROKER_CLIENT_KEY": tls / "admin.key",
            "VAULT_ADDR": self._vault.addr,
            "BAO_ADDR": self._vault.addr,
            "AWS_ENDPOINT_URL_KMS": self._kms.endpoint,
            "SOFTHSM2_CONF": self.layout.softhsm_conf,
        }
        # The README's commands run as written after sourcing this file: `keybroker` is the
        # one installed beside the interpreter running this stack (the project's virtualenv).
        bin_dir = shlex.quote(str(Path(sys.executable).parent))
        text = (
            f"# Source me: . {self.layout.env_file}\n"
            + "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in lines.items())
            + f'export PATH={bin_dir}:"$PATH"\n'
        )
        self.layout.env_file.write_text(text)
