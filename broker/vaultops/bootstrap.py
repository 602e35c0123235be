"""``keybroker vault bootstrap``: make any Vault ready for the broker, idempotently.

Each step looks before it acts, so a second run changes nothing and says so.
Recovery keys and the root token exist only in the file the operator names
(mode 0600, written before anything else could fail) and are never logged.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

from broker._files import check_writable_target, write_private
from broker.errors import BrokerError
from broker.vaultops.policy import (
    CLIENT_ROLE,
    POLICY_NAME,
    SERVER_ROLE,
    Mounts,
    render_broker_policy,
)

AUDITED_HEADER = "X-Request-Id"


class BootstrapError(BrokerError):
    code = "bootstrap_failed"
    title = "Vault bootstrap failed"


@dataclass(frozen=True)
class BootstrapOptions:
    address: str
    approle_dir: Path
    init_output: Path | None = None
    token: str | None = None
    ca_file: Path | None = None
    mounts: Mounts = field(default_factory=Mounts)
    trust_domain: str = "keybroker.dev"
    role_name: str = POLICY_NAME
    token_ttl: str = "1h"  # noqa: S105 - a duration
    token_max_ttl: str = "24h"  # noqa: S105 - a duration
    unseal_timeout: float = 30.0


@dataclass
class BootstrapResult:
    initialized_now: bool = False
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    role_id_file: Path | None = None
    secret_id_file: Path | None = None


Progress = Callable[[str], None]


def bootstrap(opts: BootstrapOptions, progress: Progress = lambda _msg: None) -> BootstrapResult:
    """Run every step; raise BootstrapError with what to do when one cannot be done."""
    client = hvac.Client(url=opts.address, verify=str(opts.ca_file) if opts.ca_file else True, timeout=10)
    result = BootstrapResult()
    try:
        token = _initialize(client, opts, result, progress)
        client.token = token
        _wait_active(opts, opts.unseal_timeout)
        _check_token(client)
        m = opts.mounts
        _mount(client, m.transit, "transit", {}, result, progress)
        _mount(client, m.kv, "kv", {"version": "2"}, result, progress)
        _mount(client, m.pki_root, "pki", {}, result, progress, max_ttl="87600h")
        _mount(client, m.pki, "pki", {}, result, progress, max_ttl="43800h")
        _pki(client, opts, result, progress)
        _audit_header(client, result, progress)
        _policy(client, m, result, progress)
        _approle(client, opts, result, progress)
    except hvac.exceptions.VaultError as exc:
        raise BootstrapError(f"Vault refused a bootstrap step: {_vault_message(exc)}") from None
    except requests.exceptions.RequestException as exc:
        raise BootstrapError(f"cannot reach Vault at {opts.address} ({exc.__class__.__name__})") from None
    return result


def _vault_message(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None) or [str(exc)]
    return "; ".join(str(e) for e in errors)


def _initialize(
    client: hvac.Client, opts: BootstrapOptions, result: BootstrapResult, progress: Progress
) -> str:
    if client.sys.is_initialized():
        result.unchanged.append("initialize")
        if not opts.token:
            raise BootstrapError(
                "Vault is already initialised: give an operator token with --token-file or the "
                "VAULT_TOKEN (or BAO_TOKEN) environment variable"
            )
        return opts.token
    if opts.init_output is None:
        raise BootstrapError(
            "Vault is not initialised: name where to write its recovery keys with --init-output"
        )
    # The recovery keys are shown once: make sure they can be kept before asking for them.
    try:
        check_writable_target(opts.init_output)
    except (FileExistsError, PermissionError) as exc:
        raise BootstrapError(f"--init-output: {exc}") from None
    progress("initialising Vault (recovery keys; the seal unseals it)")
    answer = client.sys.initialize(recovery_shares=5, recovery_threshold=3)
    record = {
        "recovery_keys_b64": answer.get("recovery_keys_base64", []),
        "recovery_threshold": 3,
        "root_token": answer["root_token"],
        "initialized_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "address": opts.address,
    }
    write_private(opts.init_output, json.dumps(record, indent=2) + "\n")
    progress(f"recovery keys and root token written to {opts.init_output} (mode 0600); move them offline")
    result.initialized_now = True
    result.changed.append("initialize")
    return str(answer["root_token"])


def _wait_active(opts: BootstrapOptions, timeout: float) -> None:
    """Wait until Vault is unsealed *and* active: a node just unsealed may still refuse writes."""
    verify: str | bool = str(opts.ca_file) if opts.ca_file else True
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while True:
        resp = requests.get(f"{opts.address.rstrip('/')}/v1/sys/health", verify=verify, timeout=5)
        if resp.status_code == 200:
            return
        with contextlib.suppress(ValueError):
            status = resp.json()
        if time.monotonic() > deadline:
            state = "sealed" if status.get("sealed", True) else "unsealed but not active (standby?)"
            raise BootstrapError(
                f"Vault is still {state} after {timeout:g}s; check its seal configuration and that "
                "the KMS key is reachable"
            )
        time.sleep(0.2)


def _check_token(client: hvac.Client) -> None:
    try:
        client.auth.token.lookup_self()
    except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
        raise BootstrapError(
            "the operator token was refused by Vault (expired, revoked or mistyped)"
        ) from None


def _mount(
    client: hvac.Client,
    path: str,
    kind: str,
    options: dict[str, str],
    result: BootstrapResult,
    progress: Progress,
    *,
    max_ttl: str | None = None,
) -> None:
    mounts = client.sys.list_mounted_secrets_engines()
    mounts = mounts.get("data", mounts)
    existing = mounts.get(path + "/")
    step = f"mount {path} ({kind})"
    if existing is not None:
        if existing.get("type") != kind:
            raise BootstrapError(f"{path}/ is already mounted as {existing.get('type')!r}, expected {kind!r}")
        result.unchanged.append(step)
        return
    config = {"max_lease_ttl": max_ttl} if max_ttl else None
    client.sys.enable_secrets_engine(kind, path=path, options=options or None, config=config)
    progress(f"enabled {kind} at {path}/")
    result.changed.append(step)


def _has_issuer(client: hvac.Client, mount: str) -> bool:
    try:
        listing = client.adapter.list(f"/v1/{mount}/issuers")
    except hvac.exceptions.InvalidPath:
        return False
    return bool(listing and listing.get("data", {}).get("keys"))


def _pki(client: hvac.Client, opts: BootstrapOptions, result: BootstrapResult, progress: Progress) -> None:
    m = opts.mounts
    if _has_issuer(client, m.pki_root):
        result.unchanged.append("pki root CA")
    else:
        client.adapter.post(
            f"/v1/{m.pki_root}/root/generate/internal",
            json={
                "common_name": "keybroker root CA",
                "ttl": "87600h",
                "key_type": "ec",
                "key_bits": 384,
            },
        )
        progress("generated the root CA")
        result.changed.append("pki root CA")
    if _has_issuer(client, m.pki):
        result.unchanged.append("pki intermediate CA")
    else:
        csr = client.adapter.post(
            f"/v1/{m.pki}/intermediate/generate/internal",
            json={"common_name": "keybroker intermediate CA", "key_type": "ec", "key_bits": 256},
        )["data"]["csr"]
        signed = client.adapter.post(
            f"/v1/{m.pki_root}/root/sign-intermediate",
            json={"csr": csr, "format": "pem_bundle", "ttl": "43800h"},
        )["data"]["certificate"]
        client.adapter.post(f"/v1/{m.pki}/intermediate/set-signed", json={"certificate": signed})
        progress("generated the intermediate CA, signed by the root")
        result.changed.append("pki intermediate CA")
    # A role write replaces the whole role (unnamed fields fall back to defaults), so writing
    # both on every run brings a role created by an older, looser bootstrap up to date.
    client.adapter.post(f"/v1/{m.pki}/roles/{SERVER_ROLE}", json=server_role())
    client.adapter.post(f"/v1/{m.pki}/roles/{CLIENT_ROLE}", json=client_role(opts.trust_domain))
    result.changed.append("pki roles (written every run)")


# Both roles: P-256 keys, a digital-signature key usage, 30 days at most, stored (so revocable).
_LEAF = {
    "key_type": "ec",
    "key_bits": 256,
    "key_usage": ["DigitalSignature"],
    "max_ttl": "720h",
    "ttl": "720h",
    "no_store": False,
    "require_cn": True,
    "allow_glob_domains": False,
    "allow_wildcard_certificates": False,
    "enforce_hostnames": True,
    "cn_validations": ["hostname"],
    "allowed_other_sans": [],
    "allowed_serial_numbers": [],
    "allowed_user_ids": [],
    "allow_token_displayname": False,
    "basic_constraints_valid_for_non_ca": False,
    "code_signing_flag": False,
    "email_protection_flag": False,
    "ext_key_usage": [],
    "ext_key_usage_oids": [],
}


def server_role() -> dict[str, Any]:
    """Broker server certificates: ``localhost`` and loopback IP SANs only (the dev stack's listener)."""
    return {
        **_LEAF,
        "allowed_domains": ["localhost"],
        "allow_localhost": True,
        "allow_bare_domains": True,
        "allow_subdomains": False,
        "allow_any_name": False,
        "allow_ip_sans": True,
        "allowed_ip_sans_cidr": ["127.0.0.1/32", "::1/128"],
        "allowed_uri_sans": [],
        "server_flag": True,
        "client_flag": False,
    }


def client_role(trust_domain: str) -> dict[str, Any]:
    """Client certificates: one identity of this trust domain, client authentication only.

    The CN must be a host-style name under the trust domain (``<name>.<kind>.<domain>``:
    letters, digits and hyphens, no ``*``, no bare domain; it is also the one DNS SAN, as
    Vault copies it there), so a certificate from this role
    that carries no SPIFFE ID can only ever be ``cn:<something>.<domain>``, never a short
    ``cn:admin``. URI SANs must start ``spiffe://<domain>/``; the glob Vault applies
    there cannot say "exactly two segments without ``*``", which the broker's own SPIFFE
    parser enforces at every handshake (another shape is refused, not ignored).
    """
    return {
        **_LEAF,
        "allowed_domains": [trust_domain],
        "allow_bare_domains": False,
        "allow_subdomains": True,
        "allow_localhost": False,
        "allow_any_name": False,
        "allow_ip_sans": False,
        "allowed_uri_sans": [f"spiffe://{trust_domain}/*"],
        "allowed_uri_sans_template": False,
        "server_flag": False,
        "client_flag": True,
    }


def _audit_header(client: hvac.Client, result: BootstrapResult, progress: Progress) -> None:
    listing = client.adapter.get("/v1/sys/config/auditing/request-headers") or {}
    headers = (listing.get("data") or listing).get("headers") or {}
    if AUDITED_HEADER.lower() in {str(name).lower() for name in headers}:
        result.unchanged.append("audited header")
        return
    client.adapter.post(f"/v1/sys/config/auditing/request-headers/{AUDITED_HEADER}", json={"hmac": False})
    progress(f"Vault now audits the {AUDITED_HEADER} request header")
    result.changed.append("audited header")


def _policy(client: hvac.Client, m: Mounts, result: BootstrapResult, progress: Progress) -> None:
    wanted = render_broker_policy(m)
    try:
        current = client.sys.read_policy(POLICY_NAME)
        text = (current.get("data") or current).get("rules", "")
    except hvac.exceptions.InvalidPath:
        text = ""
    if text == wanted:
        result.unchanged.append("broker policy")
        return
    client.sys.create_or_update_policy(POLICY_NAME, wanted, pretty_print=False)
    progress(f"wrote Vault policy {POLICY_NAME}")
    result.changed.append("broker policy")


def _approle(
    client: hvac.Client, opts: BootstrapOptions, result: BootstrapResult, progress: Progress
) -> None:
    m = opts.mounts
    methods = client.sys.list_auth_methods()
    methods = methods.get("data", methods)
    if m.approle + "/" not in methods:
        client.sys.enable_auth_method("approle", path=m.approle)
        progress(f"enabled AppRole auth at {m.approle}/")
        result.changed.append("approle auth")
    client.auth.approle.create_or_update_approle(
        opts.role_name,
        token_policies=[POLICY_NAME],
        token_no_default_policy=True,
        token_ttl=opts.token_ttl,
        token_max_ttl=opts.token_max_ttl,
        token_type="service",  # noqa: S106 - a token kind, not a secret
        mount_point=m.approle,
    )
    role_id = client.auth.approle.read_role_id(opts.role_name, mount_point=m.approle)["data"]["role_id"]
    role_file = opts.approle_dir / "role-id"
    secret_file = opts.approle_dir / "secret-id"
    write_private(role_file, role_id + "\n")
    if secret_file.exists() and _secret_id_valid(client, opts, secret_file):
        result.unchanged.append("approle secret id")
    else:
        secret = client.auth.approle.generate_secret_id(opts.role_name, mount_point=m.approle)["data"][
            "secret_id"
        ]
        write_private(secret_file, secret + "\n")
        progress(f"issued a new AppRole secret id into {secret_file} (mode 0600)")
        result.changed.append("approle secret id")
    result.role_id_file = role_file
    result.secret_id_file = secret_file


def _secret_id_valid(client: hvac.Client, opts: BootstrapOptions, secret_file: Path) -> bool:
    secret = secret_file.read_text().strip()
    try:
        answer: Any = client.adapter.post(
            f"/v1/auth/{opts.mounts.approle}/role/{opts.role_name}/secret-id/lookup",
            json={"secret_id": secret},
        )
    except hvac.exceptions.VaultError:
        return False
    return bool(answer and answer.get("data"))
