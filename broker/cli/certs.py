"""``keybroker certs issue``: a client certificate for a principal, signed by Vault's PKI.

The private key is made here and never leaves this machine: only a certificate signing
request goes to Vault's ``<pki>/sign/<client role>`` endpoint, with the operator's own
Vault address and token (``VAULT_ADDR``, ``VAULT_TOKEN`` or ``--vault-token-file``; the
broker itself cannot issue identities). An existing CSR can be given instead, so the key
can stay on the principal's own machine. Files are created with mode 0600 and never
replace an existing file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.cli.common import Session, add_command, add_group, create_private
from broker.cli.vault import safe_vault_address
from broker.errors import BrokerError, ConfigError
from broker.policy.model import principal_from_id
from broker.vaultops.policy import CLIENT_ROLE, Mounts

EPILOG = """\
examples (a Vault operator; in the dev stack the root token is in .keybroker/dev/vault/init.json):
  export VAULT_TOKEN="$(jq -r .root_token .keybroker/dev/vault/init.json)"
  keybroker certs issue spiffe://keybroker.dev/user/dana --ttl 24h     # dana.crt, dana.key (0600)
  keybroker certs issue spiffe://keybroker.dev/app/batch --csr batch.csr --cert-out batch.crt
the token needs only: path "kb-pki/sign/broker-client" { capabilities = ["update"] }
"""
# The client role's CN rule: <name>.<kind>.<trust domain>, each part a DNS label.
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TTL = re.compile(r"^([0-9]{1,7})([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class VaultRefused(BrokerError):
    code = "vault_refused"
    title = "Vault refused the request"


def identity(spiffe_id: str) -> tuple[str, str]:
    """The SPIFFE id (normalised) and the CN the client role requires for it."""
    try:
        principal = principal_from_id(spiffe_id)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if principal.kind == "cn":
        raise ConfigError("certs issue takes a SPIFFE id, spiffe://<trust-domain>/<kind>/<name>")
    domain = principal.id.removeprefix("spiffe://").split("/")[0]
    for what, label in (("kind", principal.kind), ("name", principal.name)):
        if not _LABEL.fullmatch(label):
            raise ConfigError(
                f"the {what} {label!r} cannot be a DNS label (a-z, 0-9, '-', at most 63), which Vault's "
                f"client role needs: the certificate's CN is <name>.<kind>.{domain}"
            )
    return principal.id, f"{principal.name}.{principal.kind}.{domain}"


def ttl_seconds(value: str) -> int:
    found = _TTL.fullmatch(value.strip())
    seconds = int(found.group(1)) * _SECONDS[found.group(2)] if found else 0
    if seconds < 60:
        raise ConfigError(f"--ttl: {value!r}: give a duration of at least a minute, e.g. 24h, 7d, 30m")
    return seconds


def _vault(args: argparse.Namespace) -> tuple[str, str, ssl.SSLContext | None]:
    """Vault's address, the operator's token and the TLS context to reach it."""
    address = (args.vault_addr or os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR") or "").rstrip(
        "/"
    )
    if not address:
        raise ConfigError("give Vault's address with --vault-addr or VAULT_ADDR")
    if not safe_vault_address(address):
        raise ConfigError(
            f"refusing plain http to {address}: your Vault token would cross the network unencrypted "
            "(plain http is accepted only to a loopback address)"
        )
    if args.vault_token_file:
        try:
            token = Path(args.vault_token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--vault-token-file: {exc.strerror}: {args.vault_token_file}") from None
    else:
        token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN") or ""
    if not token:
        raise ConfigError(
            "give a Vault token allowed to sign client certificates: VAULT_TOKEN or --vault-token-file "
            '(dev stack: export VAULT_TOKEN="$(jq -r .root_token .keybroker/dev/vault/init.json)")'
        )
    ca = args.vault_ca_file or os.environ.get("VAULT_CACERT")
    context = None
    if address.startswith("https://"):
        try:
            context = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use the Vault CA {ca}: {exc}") from None
    return address, token, context


def _new_key_and_csr(spiffe_id: str, common_name: str) -> tuple[bytes, str]:
    """A P-256 key (the client role's key type) and a CSR naming the CN and the SPIFFE id."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, csr.public_bytes(serialization.Encoding.PEM).decode()


def _given_csr(path: str, spiffe_id: str, common_name: str) -> str:
    """The CSR from a file, checked to name exactly this identity (Vault signs what the CSR says)."""
    from cryptography import x509

    try:
        text = Path(path).read_text()
        csr = x509.load_pem_x509_csr(text.encode())
    except OSError as exc:
        raise ConfigError(f"--csr: {exc.strerror}: {path}") from None
    except ValueError:
        raise ConfigError(f"--csr: {path} is not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise ConfigError(f"--csr: {path}: the request's signature does not verify")
    names = [a.value for a in csr.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
        others = len(list(sans)) - len(uris)
    except x509.ExtensionNotFound:
        uris, others = [], 0
    if names != [common_name] or uris != [spiffe_id] or others:
        raise ConfigError(
            f"--csr: {path} asks for CN {names} and URIs {uris} (and {others} other names); for {spiffe_id} "
            f"it must carry exactly CN {common_name!r} and the URI SAN {spiffe_id}"
        )
    return text


def _sign(address: str, token: str, context: ssl.SSLContext | None, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(  # noqa: S310 - https, or http to loopback only (checked)
        f"{address}/v1/{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"X-Vault-Token": token, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as resp:  # noqa: S310
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            errors = json.loads(exc.read()).get("errors") or []
        except ValueError:
            errors = []
        said = "; ".join(str(e) for e in errors)[:500] or exc.reason
        hint = f" (the token needs update on {path})" if exc.code == 403 else ""
        raise VaultRefused(f"Vault refused to sign ({exc.code}): {said}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise VaultRefused(f"cannot reach Vault at {address}: {reason}") from None


def cmd_issue(args: argparse.Namespace, session: Session) -> int:
    spiffe_id, common_name = identity(args.spiffe_id)
    ttl = ttl_seconds(args.ttl)
    name = common_name.split(".")[0]
    cert_out = args.cert_out or f"{name}.crt"
    key_out = None if args.csr else (args.key_out or f"{name}.key")
    if args.csr and args.key_out:
        raise ConfigError("--key-out goes with a key made here; with --csr the key stays where it is")
    for flag, path in (("--cert-out", cert_out), ("--key-out", key_out)):
        if path and os.path.lexists(path):
            raise ConfigError(f"{flag}: {path} already exists; refusing to overwrite it")
    address, token, context = _vault(args)
    if args.csr:
        key_pem, csr = None, _given_csr(args.csr, spiffe_id, common_name)
    else:
        key_pem, csr = _new_key_and_csr(spiffe_id, common_name)
    path = f"{args.pki_mount}/sign/{args.role}"
    body = {"csr": csr, "common_name": common_name, "uri_sans": spiffe_id, "ttl": f"{ttl}s"}
    data = (_sign(address, token, context, path, body) or {}).get("data") or {}
    if not data.get("certificate"):
        raise VaultRefused(f"Vault answered {path} without a certificate")
    chain = [c.strip() for c in data.get("ca_chain") or [data.get("issuing_ca", "")] if c]
    bundle = "\n".join([data["certificate"].strip(), *chain]) + "\n"
    # The key first: a certificate without its key is useless, a key alone is harmless to retry.
    if key_pem is not None and key_out:
        create_private(key_out, key_pem, "--key-out")
    create_private(cert_out, bundle.encode(), "--cert-out")
    expires = datetime.fromtimestamp(int(data.get("expiration") or 0), UTC)
    result = {
        "principal": spiffe_id,
        "common_name": common_name,
        "serial_number": data.get("serial_number"),
        "expires_at": expires.isoformat(),
        "certificate": cert_out,
        "private_key": key_out,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    serial = data.get("serial_number")
    print(f"issued {spiffe_id} (CN {common_name}), serial {serial}, until {expires:%Y-%m-%d %H:%M} UTC")
    print(f"  certificate  {cert_out}  (with its CA chain)")
    if key_out:
        print(f"  private key  {key_out}  (mode 0600, made here; only the CSR went to Vault)")
    if (expires - datetime.now(UTC)).total_seconds() < ttl - 300:
        print(
            f"  note: shorter than --ttl {args.ttl}: Vault capped it at the role's max_ttl", file=sys.stderr
        )
    key_hint = key_out or "<your key>"
    print(f"use it:  KEYBROKER_CLIENT_CERT={cert_out} KEYBROKER_CLIENT_KEY={key_hint} keybroker ...")
    return 0


def add_parsers(sub: Any) -> None:
    certs = add_group(
        sub,
        "certs",
        "issue client certificates for principals through Vault's PKI (Vault operators)",
        "Onboard a principal: after `keybroker bindings set SPIFFE_ID ROLE`, give it a certificate. "
        "Talks to Vault directly with your Vault token, not to the broker.",
        EPILOG,
    )
    p = add_command(
        certs,
        "issue",
        "sign a client certificate for a SPIFFE id (the key is made here, or bring a CSR)",
        cmd_issue,
        online=False,
    )
    p.add_argument("spiffe_id", metavar="SPIFFE_ID", help="spiffe://<trust-domain>/<kind>/<name>")
    p.add_argument("--ttl", default="24h", help="how long it is valid, e.g. 24h, 7d (default: %(default)s)")
    p.add_argument("--cert-out", metavar="FILE", help="certificate and CA chain (default: <name>.crt)")
    p.add_argument("--key-out", metavar="FILE", help="the new private key, mode 0600 (default: <name>.key)")
    p.add_argument("--csr", metavar="FILE", help="sign this PEM CSR instead of making a key here")
    p.add_argument("--vault-addr", help="Vault's address (default: $VAULT_ADDR)")
    p.add_argument("--vault-token-file", metavar="FILE", help="your Vault token (default: $VAULT_TOKEN)")
    p.add_argument(
        "--vault-ca-file", metavar="FILE", help="CA of Vault's TLS certificate (default: $VAULT_CACERT)"
    )
    p.add_argument("--pki-mount", default=Mounts().pki, help="(default: %(default)s)")
    p.add_argument("--role", default=CLIENT_ROLE, help="the PKI role for clients (default: %(default)s)")
