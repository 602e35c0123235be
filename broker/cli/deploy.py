"""``keybroker deploy``: the files ``docker-compose.yml`` mounts, and the KMS stand-in's unseal key.

``deploy init`` writes, under ``--dir`` (default ``.keybroker/deploy``), everything the compose
file names that is not made at run time: a deployment CA and the TLS certificates of the three
OpenBao nodes, the brokers and a first administrator; each node's OpenBao config; each replica's
broker config; the HSM PINs, the audit HMAC key and the SoftHSM2 config. Secrets and private keys
are 0600 in 0700 directories, and nothing existing is replaced without ``--force``. What only a
running cluster can make (the AppRole files, Vault's recovery keys) is written by the compose
file's ``vault-init`` service.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
from pathlib import Path
from typing import Any

from broker._files import write_private
from broker.cli.common import EXIT_FAILED, Session, add_command, fail

DEFAULT_DIR = ".keybroker/deploy"
VAULT_NODES = ("vault-1", "vault-2", "vault-3")
BROKERS = ("broker-1", "broker-2")
KMS_ENDPOINT = "http://kms:4566"
KMS_REGION = "us-east-1"
UNSEAL_ALIAS = "alias/keybroker-unseal"
HSM_TOKEN_LABEL = "keybroker"  # noqa: S105 - a PKCS#11 token label, not a secret
# Paths inside the containers (docker-compose.yml mounts the files there).
BROKER_ETC = "/etc/keybroker"
APPROLE_DIR = "/var/lib/keybroker/approle"
AUDIT_DIR = "/var/lib/keybroker/audit"
SOFTHSM_TOKENS = "/var/lib/softhsm/tokens"
PKCS11_LIBRARY = "/usr/lib/softhsm/libsofthsm2.so"
LEAF_DAYS = 397
CA_DAYS = 5 * 365


def _vault_hcl(node: str) -> str:
    joins = "".join(
        f"""
  retry_join {{
    leader_api_addr     = "https://{peer}:8200"
    leader_ca_cert_file = "/etc/openbao/tls/ca.pem"
  }}"""
        for peer in VAULT_NODES
    )
    return f"""\
# Written by `keybroker deploy init`: OpenBao node {node} of a 3-node raft cluster,
# auto-unsealed by the KMS stand-in (production: real AWS KMS, no endpoint).
ui            = false
# Integrated storage: OpenBao recommends turning mlock off (raft maps its files).
disable_mlock = true
api_addr      = "https://{node}:8200"
cluster_addr  = "https://{node}:8201"

storage "raft" {{
  path    = "/openbao/data"
  node_id = "{node}"{joins}
}}

listener "tcp" {{
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_cert_file   = "/etc/openbao/tls/vault.crt"
  tls_key_file    = "/etc/openbao/tls/vault.key"
  tls_min_version = "tls12"
}}

seal "awskms" {{
  region     = "{KMS_REGION}"
  kms_key_id = "{UNSEAL_ALIAS}"
  endpoint   = "{KMS_ENDPOINT}"
}}

audit "file" "keybroker" {{
  options {{
    file_path = "/openbao/logs/audit.log"
    mode      = "0600"
  }}
}}
"""


def _broker_toml(node: str, trust_domain: str) -> str:
    return f"""\
# Written by `keybroker deploy init`: broker replica {node} (docker-compose.yml).
[server]
host = "0.0.0.0"
port = 8443
cert_file = "{BROKER_ETC}/tls/broker.crt"
key_file = "{BROKER_ETC}/tls/broker.key"
client_ca_file = "{BROKER_ETC}/tls/ca.pem"
trust_domain = "{trust_domain}"
administrators = ["spiffe://{trust_domain}/user/admin"]
# Client certificates come from the deployment CA written by `deploy init`, not from Vault's
# PKI, so there is no Vault CRL to check. Issue client certificates from kb-pki
# (`keybroker certs issue`), trust its chain in client_ca_file and set "kb-pki" here to have
# revocation enforced (README "Production deployment").
crl_pki_mount = ""

[vault]
# The raft cluster: the broker moves to another node when one is sealed, lost or a standby
# without a leader (README "A Vault cluster and several broker replicas").
address = "https://{VAULT_NODES[0]}:8200"
addresses = [{", ".join(f'"https://{n}:8200"' for n in VAULT_NODES)}]
ca_file = "{BROKER_ETC}/tls/ca.pem"
role_id_file = "{APPROLE_DIR}/role-id"
secret_id_file = "{APPROLE_DIR}/secret-id"

[kms]
region = "{KMS_REGION}"
# The KMS stand-in of the compose file speaks plain http on its internal network only;
# with real AWS KMS leave endpoint out (https) and drop allow_insecure_http.
endpoint = "{KMS_ENDPOINT}"
allow_insecure_http = true

[hsm]
library = "{PKCS11_LIBRARY}"
token_label = "{HSM_TOKEN_LABEL}"
pin_file = "/run/secrets/hsm_pin"

[audit]
directory = "{AUDIT_DIR}"
node = "{node}"
hmac_key_file = "/run/secrets/audit_hmac_key"
"""


def _softhsm_conf() -> str:
    return f"directories.tokendir = {SOFTHSM_TOKENS}\nobjectstore.backend = file\nlog.level = ERROR\n"


class _Ca:
    """The deployment CA: signs the servers' and the first administrator's certificates."""

    def __init__(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.now = datetime.datetime.now(datetime.UTC)
        self.key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keybroker deployment CA")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(minutes=5))
            .not_valid_after(self.now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA384())
        )

    def issue(self, cn: str, *, dns: tuple[str, ...] = (), uri: str | None = None, server: bool) -> Any:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        if server:
            names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        if uri:
            names.append(x509.UniformResourceIdentifier(uri))
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.now - datetime.timedelta(minutes=5))
            .not_valid_after(self.now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            # Server certificates also authenticate raft peers to each other.
            .add_extension(
                x509.ExtendedKeyUsage([usage, ExtendedKeyUsageOID.CLIENT_AUTH] if server else [usage]),
                critical=False,
            )
            .sign(self.key, hashes.SHA384())
        )
        return cert, key


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = cert.public_bytes(serialization.Encoding.PEM)
    return data


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return data


def planned_files(trust_domain: str) -> dict[str, tuple[bytes, bool]]:
    """Every file ``deploy init`` writes: relative path → (content, secret?)."""
    ca = _Ca()
    files: dict[str, tuple[bytes, bool]] = {
        "tls/ca.pem": (_pem_cert(ca.cert), False),
        # Kept (owner-only) to issue more certificates; never mounted into a container.
        "tls/ca.key": (_pem_key(ca.key), True),
    }
    for node in VAULT_NODES:
        cert, key = ca.issue(node, dns=(node, "localhost"), server=True)
        files[f"tls/{node}.crt"] = (_pem_cert(cert), False)
        files[f"tls/{node}.key"] = (_pem_key(key), True)
        files[f"vault/{node}.hcl"] = (_vault_hcl(node).encode(), False)
    cert, key = ca.issue("broker", dns=(*BROKERS, "localhost"), server=True)
    files["tls/broker.crt"] = (_pem_cert(cert), False)
    files["tls/broker.key"] = (_pem_key(key), True)
    cert, key = ca.issue("admin", uri=f"spiffe://{trust_domain}/user/admin", server=False)
    files["tls/admin.crt"] = (_pem_cert(cert), False)
    files["tls/admin.key"] = (_pem_key(key), True)
    for node in BROKERS:
        files[f"broker/{node}.toml"] = (_broker_toml(node, trust_domain).encode(), False)
    files["softhsm2.conf"] = (_softhsm_conf().encode(), False)
    files["secrets/hsm-pin"] = (secrets.token_hex(16).encode() + b"\n", True)
    files["secrets/hsm-so-pin"] = (secrets.token_hex(16).encode() + b"\n", True)
    files["secrets/audit-hmac-key"] = (secrets.token_hex(32).encode() + b"\n", True)
    return files


def init(directory: Path, *, trust_domain: str, force: bool = False) -> list[Path]:
    """Write every file; refuse (FileExistsError, nothing written) if one exists and not ``force``."""
    files = planned_files(trust_domain)
    targets = {directory / rel: content for rel, content in files.items()}
    existing = sorted(str(p) for p in targets if p.exists())
    if existing and not force:
        raise FileExistsError(
            f"{len(existing)} file(s) already exist, e.g. {existing[0]}; pass --force to replace them all"
        )
    old = os.umask(0o077)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        for path, (content, secret) in targets.items():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(path, content)
            if not secret:
                path.chmod(0o644)
    finally:
        os.umask(old)
    return sorted(targets)


def cmd_init(args: argparse.Namespace, session: Session) -> int:
    directory = Path(args.dir)
    try:
        written = init(directory, trust_domain=args.trust_domain, force=args.force)
    except FileExistsError as exc:
        return fail(str(exc), EXIT_FAILED)
    print(f"wrote {len(written)} files under {directory} (secrets and private keys 0600, directories 0700)")
    print(
        "next (README 'Production deployment'):\n"
        f"  export KEYBROKER_DEPLOY_DIR={directory}\n"
        "  docker compose up -d kms kms-init hsm-init vault-1 vault-2 vault-3\n"
        "  docker compose run --rm vault-init   # once: init + bootstrap\n"
        "  docker compose up -d broker-1 broker-2\n"
        "The containers must be able to read their files: the broker image runs as uid 10001, OpenBao "
        "as its image's 'openbao' user; chown the mounted files accordingly before `up`."
    )
    return 0


def cmd_kms_key(args: argparse.Namespace, session: Session) -> int:
    if not args.alias.startswith("alias/"):
        return fail("--alias must start with alias/", EXIT_FAILED)
    from broker.vaultops.kms_seal import ensure_unseal_key

    key_id = ensure_unseal_key(args.endpoint, args.alias, args.region)
    print(f"{args.alias} -> {key_id}")
    return 0


def _read_pin(path: str, flag: str) -> str:
    """The PIN a file holds (surrounding blanks dropped); ConfigError names the flag, never the value."""
    from broker.config.secrets import read_secret_file
    from broker.errors import ConfigError

    try:
        pin = read_secret_file(Path(path), flag)
    except (OSError, UnicodeError) as exc:
        # A directory, a FIFO gone away, bytes that are not UTF-8: the reason, not the content.
        raise ConfigError(f"cannot read {path}: {exc.__class__.__name__}", key=flag) from None
    if "\n" in pin:
        raise ConfigError(f"{path} holds more than one line; a PIN file holds the PIN alone", key=flag)
    return pin


def cmd_hsm_token(args: argparse.Namespace, session: Session) -> int:
    from broker.backends.hsm_token import TokenError, ensure_token

    user_pin = _read_pin(args.pin_file, "--pin-file")
    so_pin = _read_pin(args.so_pin_file, "--so-pin-file")
    try:
        state = ensure_token(args.library, args.label, user_pin=user_pin, so_pin=so_pin)
    except TokenError as exc:
        return fail(f"hsm token: {exc}", EXIT_FAILED)
    if state.initialised:
        print(f"token {state.label!r} initialised (slot {state.slot}); user PIN set from {args.pin_file}")
    else:
        print(f"token {state.label!r} exists (slot {state.slot}) and the PIN in {args.pin_file} opens it")
    return 0


# A SPIFFE trust domain as this deployment writes it into TOML strings, URIs and certificates:
# lower-case DNS labels joined by dots, nothing a config file or a URI could read differently.
_TRUST_DOMAIN = re.compile(
    r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)


def _trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN.fullmatch(value):
        raise argparse.ArgumentTypeError("must be lower-case DNS labels joined by dots, e.g. bank.example")
    return value


def add_parsers(sub: Any) -> None:
    deploy = sub.add_parser("deploy", help="prepare the files docker-compose.yml mounts", description=__doc__)
    dsub = deploy.add_subparsers(dest="deploy_command", metavar="COMMAND", required=True)
    init_cmd = add_command(
        dsub,
        "init",
        "write every certificate, secret and config the compose file mounts",
        cmd_init,
        online=False,
        json_output=False,
        description="Write a deployment CA, TLS certificates (3 OpenBao nodes, the brokers, an "
        "administrator), OpenBao and broker configs, HSM PINs and the audit HMAC key under --dir, "
        "owner-only. Refuses to replace any existing file unless --force.",
    )
    init_cmd.add_argument("--dir", default=DEFAULT_DIR, help="where to write (default: %(default)s)")
    init_cmd.add_argument("--force", action="store_true", help="replace files that already exist")
    init_cmd.add_argument(
        "--trust-domain",
        default="keybroker.dev",
        type=_trust_domain,
        help="SPIFFE trust domain of client certificates: lower-case DNS labels joined by dots "
        "(default: %(default)s)",
    )
    kms = add_command(
        dsub,
        "kms-key",
        "make the KMS stand-in's OpenBao unseal key (compose only; idempotent)",
        cmd_kms_key,
        online=False,
        json_output=False,
        description="Create the KMS key OpenBao's awskms seal uses, behind an alias, unless the alias "
        "exists. For the compose file's KMS stand-in; with real AWS KMS the key is made by your "
        "infrastructure code.",
    )
    token = add_command(
        dsub,
        "hsm-token",
        "initialise the HSM token from PIN files (idempotent; no PIN on a command line)",
        cmd_hsm_token,
        online=False,
        json_output=False,
        description="Initialise the first free token of a PKCS#11 module (SoftHSM2) with --label, "
        "its SO PIN and user PIN read from files, unless a token with that label exists; then only "
        "check that the user PIN opens it. Unlike softhsm2-util --init-token, no PIN is passed on a "
        "command line, where every user of the host could read it.",
    )
    token.add_argument(
        "--library",
        default=os.environ.get("KEYBROKER__HSM__LIBRARY") or PKCS11_LIBRARY,
        help="the PKCS#11 module (default: $KEYBROKER__HSM__LIBRARY or %(default)s)",
    )
    token.add_argument("--label", default=HSM_TOKEN_LABEL, help="token label (default: %(default)s)")
    token.add_argument("--pin-file", required=True, help="file holding the user PIN")
    token.add_argument("--so-pin-file", required=True, help="file holding the security officer PIN")
    kms.add_argument("--endpoint", required=True, help="KMS endpoint URL")
    kms.add_argument("--alias", default=UNSEAL_ALIAS, help="(default: %(default)s)")
    kms.add_argument("--region", default=KMS_REGION, help="(default: %(default)s)")
