"""The whole local stack, started in order and stopped in reverse.

    KMS stand-in ─▶ OpenBao (awskms seal, raft, file audit) ─▶ bootstrap ─▶
    SoftHSM2 token ─▶ certificates from Vault PKI ─▶ broker (mTLS)

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import hvac

from broker._files import write_private
from broker.devstack import hsm
from broker.devstack.broker import DevBroker
from broker.devstack.certificates import DevCertificates
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
    ) -> None:
        self.layout = Layout(state_dir.resolve())
        self.progress = progress
        self.children: dict[str, Child] = {}
        self.kms = DevKms(self.layout)
        self.vault = DevVault(self.layout, self.kms, tls=vault_tls, progress=progress)
        self.certificates = DevCertificates(self.layout, self.vault)
        self.broker = DevBroker(self.layout, self.vault, self.kms, port=broker_port, env=broker_env or {})
        self._lock_fh: IO[str] | None = None
        self._steps: list[tuple[str, float]] = []

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> StackInfo:
        started = time.monotonic()
        self._prepare_dirs()
        try:
            self._step("KMS stand-in", self.start_kms)
            self._step("OpenBao (awskms seal)", self.start_vault)
            self._step("Vault bootstrap", self.vault.bootstrap)
            self._step("role policies", self.vault.seed_policies)
            self._step("SoftHSM2 token", lambda: hsm.init_token(self.layout, self.progress))
            self._step("certificates", self.certificates.issue_all)
            self._step("broker", self.start_broker)
        except BaseException:
            self.stop()
            raise
        self.broker.write_env_file()
        return StackInfo(startup_seconds=time.monotonic() - started, steps=list(self._steps))

    def stop(self) -> None:
        for name in ("broker", "vault", "kms"):
            child = self.children.pop(name, None)
            if child is not None:
                child.stop()
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

    def check_children(self) -> None:
        """Raise ChildFailed if any child has exited."""
        for child in self.children.values():
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
        self.children["vault"] = self.vault.start()

    def restart_vault(self) -> None:
        self.children.pop("vault").stop()
        self.start_vault()

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

    def start_broker(self) -> None:
        if not port_free(self.broker_port):
            raise StackError(f"port {self.broker_port} is taken; pass --port to use another")
        write_private(self.layout.broker_config, self.render_broker_config())
        self.children["broker"] = self.spawn_broker("broker", self.layout.broker_config)
        self.wait_healthy(self.children["broker"], self.broker_url)

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
    "StackError",
    "StackInfo",
    "find_bao",
    "find_softhsm_library",
    "free_port",
    "port_free",
]
