"""The whole local stack, started in order and stopped in reverse.

    KMS stand-in ─▶ OpenBao (awskms seal, raft, file audit) ─▶ bootstrap ─▶
    SoftHSM2 token ─▶ certificates from Vault PKI ─▶ broker (mTLS)

With ``ha=True`` OpenBao is a three-node raft cluster (:mod:`~broker.devstack.cluster`)
and ``replicas`` brokers share it, each on its own port with its own node name and
audit directory.

Everything lives in one state directory, so a second run on the same directory
finds its KMS keys, Vault data (unsealed by KMS with no human step), HSM token
and certificates again. ``keybroker dev`` and the integration tests both use it.
Each component is its own module (:mod:`~broker.devstack.kms`, ``vault``, ``hsm``,
``certificates``, ``broker``); this one orders them and supervises their processes.
"""

from __future__ import annotations

import fcntl
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import hvac

from broker._files import write_private
from broker.devstack import hsm
from broker.devstack.broker import DevBroker
from broker.devstack.certificates import DevCertificates
from broker.devstack.cluster import HA_NODES, DevCluster
from broker.devstack.common import (
    DEV_AWS_ENV,
    HSM_TOKEN_LABEL,
    KMS_REGION,
    TRUST_DOMAIN,
    Layout,
    StackError,
    free_port,
    port_free,
)
from broker.devstack.hsm import find_softhsm_library
from broker.devstack.kms import DevKms
from broker.devstack.processes import Child, ChildFailed
from broker.devstack.vault import DevVault, find_bao


@dataclass(frozen=True)
class Replica:
    """One broker process of the stack: its child name, port, audit node name and directory."""

    name: str
    port: int
    node: str
    audit_dir: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@dataclass
class StackInfo:
    """How long start-up took, in all and per step."""

    startup_seconds: float
    steps: list[tuple[str, float]] = field(default_factory=list)


class DevStack:
    """Start, supervise and stop the local stack in ``state_dir``."""

    def __init__(
        self,
        state_dir: Path,
        *,
        broker_port: int = 8443,
        progress: Callable[[str], None] = lambda _m: None,
        broker_env: dict[str, str] | None = None,
        vault_tls: bool = False,
        ha: bool = False,
        replicas: int = 1,
        replica_ports: Sequence[int] | None = None,
    ) -> None:
        self.layout = Layout(state_dir.resolve())
        self.progress = progress
        self.children: dict[str, Child] = {}
        self.kms = DevKms(self.layout)
        self.ha = ha
        self.cluster = DevCluster(self.layout, self.kms, tls=vault_tls, progress=progress) if ha else None
        self.vault = (
            self.cluster.first
            if self.cluster is not None
            else DevVault(self.layout, self.kms, tls=vault_tls, progress=progress)
        )
        self.certificates = DevCertificates(self.layout, self.vault)
        self.broker = DevBroker(
            self.layout,
            self.vault,
            self.kms,
            port=broker_port,
            env=broker_env or {},
            cluster=self.cluster.nodes if self.cluster is not None else (),
        )
        if replicas < 1:
            raise StackError("--replicas must be at least 1")
        ports = list(replica_ports or [broker_port + i for i in range(replicas)])
        if len(ports) != replicas or ports[0] != broker_port:
            raise StackError("replica_ports must list one port per replica, the broker port first")
        if ha:
            self.replicas = [
                Replica(f"broker-{i}", port, f"broker-{i}", self.layout.root / f"audit-{i}")
                for i, port in enumerate(ports, start=1)
            ]
        else:
            # The single-node stack keeps its historical names (node "broker", audit/).
            self.replicas = [Replica("broker", broker_port, "broker", self.layout.audit_dir)]
            self.replicas += [
                Replica(f"broker-{i}", port, f"broker-{i}", self.layout.root / f"audit-{i}")
                for i, port in enumerate(ports[1:], start=2)
            ]
        self._lock_fh: IO[str] | None = None
        self._steps: list[tuple[str, float]] = []

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> StackInfo:
        started = time.monotonic()
        self._prepare_dirs()
        try:
            self._step("KMS stand-in", self.start_kms)
            if self.cluster is not None:
                self._step(f"OpenBao x{HA_NODES} (raft, awskms seal)", self.start_vault)
            else:
                self._step("OpenBao (awskms seal)", self.start_vault)
            self._step("Vault bootstrap", self.bootstrap_vault)
            if self.cluster is not None:
                self._step("raft cluster formed", self.form_cluster)
            self._step("role policies", self.vault.seed_policies)
            self._step("SoftHSM2 token", lambda: hsm.init_token(self.layout, self.progress))
            self._step("certificates", self.certificates.issue_all)
            brokers = "broker" if len(self.replicas) == 1 else f"brokers x{len(self.replicas)}"
            self._step(brokers, self.start_broker)
        except BaseException:
            self.stop()
            raise
        self.broker.write_env_file([r.url for r in self.replicas])
        return StackInfo(startup_seconds=time.monotonic() - started, steps=list(self._steps))

    def stop(self) -> None:
        # Brokers first (they still write audit records), then Vault, then the KMS that unseals it.
        for prefix in ("broker", "vault", "kms"):
            for name in [n for n in self.children if n == prefix or n.startswith(prefix + "-")]:
                self.children.pop(name).stop()
        for child in self.children.values():
            child.stop()
        self.children.clear()
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def _step(self, name: str, fn: Callable[[], None]) -> None:
        t0 = time.monotonic()
        self.progress(f"starting {name} ...")
        fn()
        self._steps.append((name, time.monotonic() - t0))

    def _prepare_dirs(self) -> None:
        old = os.umask(0o077)
        try:
            for d in (
                self.layout.root,
                self.layout.logs,
                self.layout.vault_dir,
                self.layout.tls,
                self.layout.hsm_dir,
                self.layout.audit_dir,
                self.layout.approle_dir,
                self.layout.vault_audit_log.parent,
                self.layout.kms_state.parent,
            ):
                d.mkdir(parents=True, exist_ok=True)
        finally:
            os.umask(old)
        self._lock_fh = self.layout.lock.open("w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            self._lock_fh = None
            raise StackError(f"another keybroker dev is already running on {self.layout.root}") from None
        try:
            self._check_mode()
        except StackError:
            self._lock_fh.close()
            self._lock_fh = None
            raise

    def _check_mode(self) -> None:
        """A state directory is either a single node or a cluster for good: switching would lose quorum."""
        clustered = (self.layout.vault_dir / "node-2").is_dir()
        initialised = self.layout.vault_init.is_file()
        if self.ha and initialised and not clustered:
            raise StackError(
                f"{self.layout.root} holds a single-node stack; use another --state-dir for --ha"
            )
        if not self.ha and clustered:
            raise StackError(f"{self.layout.root} holds an --ha cluster; run `keybroker dev --ha` on it")

    def check_children(self) -> None:
        """Raise ChildFailed if any child has exited (in a cluster: the KMS, or every broker).

        A cluster survives one Vault node or one broker replica going down, so there that is
        reported once and the rest keeps serving.
        """
        for name, child in list(self.children.items()):
            if child.alive():
                continue
            survivable = (
                self.ha
                and name != "kms"
                and any(
                    other.alive()
                    for n, other in self.children.items()
                    if n.split("-")[0] == name.split("-")[0]
                )
            )
            if survivable:
                self.progress(
                    f"warning: {name} exited (status {child.process.returncode}); the cluster carries on. "
                    f"Last lines of {child.log_path}:\n{child.log_tail(5)}"
                )
                del self.children[name]
                continue
            if not child.alive():
                raise ChildFailed(
                    f"{child.name} exited unexpectedly (status {child.process.returncode}).\n"
                    f"Last lines of {child.log_path}:\n{child.log_tail()}"
                )

    # -- KMS ----------------------------------------------------------------------

    @property
    def kms_endpoint(self) -> str:
        return self.kms.endpoint

    def start_kms(self) -> None:
        self.children["kms"] = self.kms.start()

    def kms_client(self) -> Any:
        return self.kms.client()

    # -- Vault --------------------------------------------------------------------

    @property
    def vault_tls(self) -> bool:
        return self.vault.tls

    @property
    def vault_addr(self) -> str:
        return self.vault.addr

    @property
    def broker_vault_addr(self) -> str:
        return self.vault.broker_addr

    def start_vault(self) -> None:
        if self.cluster is not None:
            self.children.update(self.cluster.spawn_all())
        else:
            self.children["vault"] = self.vault.start()

    def bootstrap_vault(self) -> None:
        """Initialise (node 1 of a new cluster) and configure Vault; a resumed cluster through its leader."""
        if self.cluster is not None and self.layout.vault_init.is_file():
            # Any node may have won the election; bootstrap waits for the node it talks to be active.
            self.cluster.wait_leader(self.children).bootstrap()
        else:
            self.vault.bootstrap()

    def form_cluster(self) -> None:
        """After node 1's bootstrap: every node joined, unsealed and a raft voter."""
        if self.cluster is None:
            return
        self.cluster.tune_autopilot()
        self.cluster.wait_formed(self.children)

    def restart_vault(self) -> None:
        self.children.pop("vault").stop()
        self.start_vault()

    def vault_node(self, name: str) -> DevVault:
        """A node of the cluster by its child name (``vault``, ``vault-2``, ...)."""
        nodes = self.cluster.nodes if self.cluster is not None else [self.vault]
        return next(node for node in nodes if node.name == name)

    def restart_vault_node(self, name: str) -> None:
        """Start one (killed) node of the cluster again; it rejoins and unseals itself."""
        if self.cluster is None:
            raise StackError("not a cluster: restart_vault() restarts the single node")
        old = self.children.pop(name, None)
        if old is not None:
            old.stop()
        self.children[name] = self.cluster.restart_node(self.vault_node(name))

    def root_token(self) -> str:
        return self.vault.root_token()

    def vault_client(self) -> hvac.Client:
        return self.vault.client()

    # -- certificates -------------------------------------------------------------

    def issue_client_certificate(self, stem: str, name: str, kind: str) -> str:
        """A client certificate for spiffe://<trust domain>/<kind>/<name> in tls/<stem>.{crt,key}; its id."""
        return self.certificates.issue_client(stem, name, kind)

    def issue_verbatim_client_certificate(self, stem: str, common_name: str, uri: str | None = None) -> None:
        """A client certificate exactly as asked (a name the client role refuses), for tests."""
        self.certificates.issue_verbatim(stem, common_name, uri)

    # -- broker -------------------------------------------------------------------

    @property
    def broker_port(self) -> int:
        return self.broker.port

    @property
    def broker_url(self) -> str:
        return self.broker.url

    def render_broker_config(self, *, port: int | None = None, approle_dir: Path | None = None) -> str:
        return self.broker.render_config(port=port, approle_dir=approle_dir)

    def replica_config(self, replica: Replica) -> Path:
        if replica.name == "broker":
            return self.layout.broker_config
        return self.layout.root / f"{replica.name}.toml"

    def start_broker(self) -> None:
        for replica in self.replicas:
            if not port_free(replica.port):
                raise StackError(f"port {replica.port} is taken; pass --port to use another")
        for replica in self.replicas:
            config = self.replica_config(replica)
            write_private(
                config,
                self.broker.render_config(port=replica.port, node=replica.node, audit_dir=replica.audit_dir),
            )
            self.children[replica.name] = self.spawn_broker(replica.name, config)
        for replica in self.replicas:
            self.wait_healthy(self.children[replica.name], replica.url)

    def restart_replica(self, replica: Replica) -> None:
        """Start one (killed) broker replica again on its own config and audit directory."""
        old = self.children.pop(replica.name, None)
        if old is not None:
            old.stop()
        self.children[replica.name] = self.spawn_broker(replica.name, self.replica_config(replica))
        self.wait_healthy(self.children[replica.name], replica.url)

    def spawn_broker(self, name: str, config: Path, **env: str) -> Child:
        return self.broker.spawn(name, config, **env)

    def client_ssl(self, who: str = "admin") -> ssl.SSLContext:
        return self.broker.client_ssl(who)

    def wait_healthy(self, child: Child, url: str, timeout: float = 60) -> None:
        self.broker.wait_healthy(child, url, timeout)


__all__ = [
    "DEV_AWS_ENV",
    "HSM_TOKEN_LABEL",
    "KMS_REGION",
    "TRUST_DOMAIN",
    "ChildFailed",
    "DevStack",
    "Layout",
    "Replica",
    "StackError",
    "StackInfo",
    "find_bao",
    "find_softhsm_library",
    "free_port",
    "port_free",
]
