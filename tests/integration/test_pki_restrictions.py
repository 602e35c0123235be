"""The Vault PKI roles bootstrap writes, and who may issue from them, on the real OpenBao.

The client role mints identities, so it takes only names of the stack's trust domain and
issues client-authentication certificates only; the broker's own AppRole may not issue
from either role (the broker mints no identities).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import hvac
import hvac.exceptions
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker._files import write_private
from broker.devstack.stack import TRUST_DOMAIN, DevStack
from broker.vaultops.bootstrap import BootstrapOptions, bootstrap, client_role
from broker.vaultops.policy import CLIENT_ROLE, SERVER_ROLE, Mounts
from tests.integration.conftest import https
from tests.integration.keyops import create_key, encrypt, lifecycle

PKI = Mounts().pki


def issue(client: hvac.Client, role: str, **body: Any) -> dict[str, Any]:
    answer: dict[str, Any] = client.adapter.post(f"/v1/{PKI}/issue/{role}", json=body)["data"]
    return answer


def refused(client: hvac.Client, role: str, **body: Any) -> bool:
    try:
        issue(client, role, **body)
    except hvac.exceptions.InvalidRequest:
        return True
    return False


@pytest.fixture
def broker_token(stack: DevStack) -> Iterator[hvac.Client]:
    """A Vault client logged in with the AppRole credentials the stack wrote for the broker."""
    approle = stack.layout.approle_dir
    client = hvac.Client(url=stack.vault_addr, timeout=10)
    client.auth.approle.login(
        role_id=(approle / "role-id").read_text().strip(),
        secret_id=(approle / "secret-id").read_text().strip(),
    )
    try:
        yield client
    finally:
        client.auth.token.revoke_self()


def test_client_role_issues_a_client_only_certificate_for_one_identity(stack: DevStack) -> None:
    """A good request gets a 30-day-at-most, client-auth-only certificate with exactly its SPIFFE ID."""
    spiffe = f"spiffe://{TRUST_DOMAIN}/app/pki-ok"
    data = issue(
        stack.vault_client(),
        CLIENT_ROLE,
        common_name=f"pki-ok.app.{TRUST_DOMAIN}",
        uri_sans=spiffe,
        ttl="8760h",
    )
    cert = x509.load_pem_x509_certificate(data["certificate"].encode())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe]
    assert san.get_values_for_type(x509.DNSName) == [f"pki-ok.app.{TRUST_DOMAIN}"]  # Vault copies the CN
    assert san.get_values_for_type(x509.IPAddress) == []
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    assert cert.not_valid_after_utc <= datetime.now(UTC) + timedelta(hours=721)


@pytest.mark.parametrize(
    "request_body",
    [
        {"common_name": "*"},
        {"common_name": f"*.{TRUST_DOMAIN}"},
        {"common_name": f"a*.app.{TRUST_DOMAIN}"},
        {"common_name": "admin"},  # would be the principal cn:admin
        {"common_name": TRUST_DOMAIN},
        {"common_name": f"x@{TRUST_DOMAIN}"},
        {"common_name": f"a b.app.{TRUST_DOMAIN}"},
        {"common_name": "evil.example.com"},
        {"common_name": "a" * 64 + f".app.{TRUST_DOMAIN}"},  # X.509 upper bound for a CN: 64
        {"uri_sans": "spiffe://evil.example/app/x"},
        {"uri_sans": f"spiffe://{TRUST_DOMAIN}.evil.example/app/x"},
        {"uri_sans": "spiffe://*/app/x"},
        {"uri_sans": f"https://{TRUST_DOMAIN}/app/x"},
        {"alt_names": "vault.internal"},
        {"alt_names": "localhost"},
        {"ip_sans": "127.0.0.1"},
    ],
)
def test_client_role_refuses_names_outside_the_trust_domain(
    stack: DevStack, request_body: dict[str, str]
) -> None:
    """Wildcard, bare, foreign and non-host CNs, foreign SPIFFE IDs, DNS and IP SANs: all refused."""
    body = {"common_name": f"pki-bad.app.{TRUST_DOMAIN}", **request_body}
    assert refused(stack.vault_client(), CLIENT_ROLE, **body), body


def test_a_wildcard_spiffe_path_the_role_cannot_express_is_refused_by_the_broker(stack: DevStack) -> None:
    """Vault's URI glob cannot forbid ``*`` in the path; the broker refuses such an identity at once."""
    data = issue(
        stack.vault_client(),
        CLIENT_ROLE,
        common_name=f"star.app.{TRUST_DOMAIN}",
        uri_sans=f"spiffe://{TRUST_DOMAIN}/app/*",
    )
    tls = stack.layout.tls
    write_private(tls / "pki-star.key", data["private_key"] + "\n")
    write_private(tls / "pki-star.crt", data["certificate"] + "\n" + "\n".join(data["ca_chain"]) + "\n")
    reply = https(stack, "/v1/keys", who="pki-star")
    assert reply.status == 401, reply.body


def test_server_role_is_localhost_and_server_auth_only(stack: DevStack) -> None:
    """The server role names localhost and nothing else, and never makes a client certificate."""
    client = stack.vault_client()
    cert = x509.load_pem_x509_certificate(
        issue(client, SERVER_ROLE, common_name="localhost", ip_sans="127.0.0.1")["certificate"].encode()
    )
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for name in ("*", "*.localhost", "a.localhost", "vault.internal", f"x.app.{TRUST_DOMAIN}"):
        assert refused(client, SERVER_ROLE, common_name=name), name
    assert refused(client, SERVER_ROLE, common_name="localhost", ip_sans="10.0.0.1")


def test_the_broker_approle_cannot_issue_or_reach_beyond_its_calls(
    stack: DevStack, broker_token: hvac.Client
) -> None:
    """With the broker's own Vault identity: 403 from both PKI roles and from the sibling paths."""
    for role in (CLIENT_ROLE, SERVER_ROLE):
        with pytest.raises(hvac.exceptions.Forbidden):
            issue(
                broker_token,
                role,
                common_name=f"minted.user.{TRUST_DOMAIN}",
                uri_sans=f"spiffe://{TRUST_DOMAIN}/user/admin",
            )
    transit = Mounts().transit
    forbidden = [
        ("POST", f"/v1/{transit}/keys/anything/trim", {"min_available_version": 1}),
        ("POST", f"/v1/{transit}/keys/anything/import", {"ciphertext": "x"}),
        ("GET", f"/v1/{transit}/export/encryption-key/anything", None),
        ("GET", f"/v1/{transit}/backup/anything", None),
        ("POST", f"/v1/{transit}/hmac/anything", {"input": "eA=="}),
        ("LIST", f"/v1/{transit}/keys", None),
        ("GET", "/v1/sys/policies/acl/keybroker-broker", None),
        ("POST", f"/v1/{PKI}/roles/{CLIENT_ROLE}", {"allow_any_name": True}),
        ("POST", f"/v1/{PKI}/sign-verbatim", {"csr": "x"}),
        ("POST", f"/v1/{PKI}/sign/{CLIENT_ROLE}", {"csr": "x"}),
        ("POST", f"/v1/{PKI}/issuer/default/issue/{CLIENT_ROLE}", {"common_name": "x"}),
        ("POST", f"/v1/{Mounts().pki_root}/root/sign-intermediate", {"csr": "x"}),
        ("DELETE", f"/v1/{Mounts().kv}/metadata/audit/anchor-broker", None),
        ("DELETE", f"/v1/{Mounts().kv}/metadata/policy/document", None),
        ("DELETE", f"/v1/{Mounts().kv}/data/audit/anchor-broker", None),
        ("POST", f"/v1/{Mounts().kv}/destroy/audit/anchor-broker", {"versions": [1]}),
        ("DELETE", f"/v1/{Mounts().kv}/metadata/keys/a/b", None),
    ]
    for method, path, body in forbidden:
        with pytest.raises(hvac.exceptions.Forbidden):
            broker_token.adapter.request(method, path, json=body)
    # The registry entry of a failed key creation can still be erased (the broker's rollback).
    kv = Mounts().kv
    broker_token.adapter.post(f"/v1/{kv}/data/keys/pki-rollback-probe", json={"data": {"x": 1}})
    broker_token.adapter.delete(f"/v1/{kv}/metadata/keys/pki-rollback-probe")
    # The broker's own transit calls all still pass under this policy.
    key = create_key(stack, "vault")
    sealed = encrypt(stack, key, b"still works")
    assert sealed.status == 200, sealed.body
    assert lifecycle(stack, key, "rotate").status == 200
    for op, body in (
        ("decrypt", {"ciphertext": sealed.json()["ciphertext"], "context": {}}),
        ("rewrap", {"ciphertext": sealed.json()["ciphertext"], "context": {}}),
        ("datakey", {"context": {}}),
    ):
        reply = https(stack, f"/v1/keys/{key}/{op}", body=body)
        assert reply.status == 200, (op, reply.body)


def test_bootstrap_again_rewrites_a_loosened_client_role(stack: DevStack) -> None:
    """Re-running bootstrap on a prepared Vault restores the restricted role in place."""
    client = stack.vault_client()
    client.adapter.post(
        f"/v1/{PKI}/roles/{CLIENT_ROLE}",
        json={"allow_any_name": True, "allowed_uri_sans": ["*"], "client_flag": True},
    )
    assert not refused(client, CLIENT_ROLE, common_name="*")

    bootstrap(
        BootstrapOptions(
            address=stack.vault_addr, approle_dir=stack.layout.approle_dir, token=stack.root_token()
        )
    )

    role = client.adapter.get(f"/v1/{PKI}/roles/{CLIENT_ROLE}")["data"]
    assert set(client_role(TRUST_DOMAIN)) <= set(role)  # every restriction is a field OpenBao knows
    assert role["allow_any_name"] is False
    assert role["allowed_uri_sans"] == [f"spiffe://{TRUST_DOMAIN}/*"]
    assert refused(client, CLIENT_ROLE, common_name="*")
    assert refused(client, CLIENT_ROLE, common_name=f"x.app.{TRUST_DOMAIN}", uri_sans="spiffe://evil/app/x")


def test_an_operator_can_still_issue_a_name_the_client_role_refuses(stack: DevStack) -> None:
    """sign-verbatim (operator token, no role) gives tests a CN ``*`` certificate the role refuses."""
    assert refused(stack.vault_client(), CLIENT_ROLE, common_name="*")
    stack.issue_verbatim_client_certificate("pki-verbatim-star", "*")
    cert = x509.load_pem_x509_certificate((stack.layout.tls / "pki-verbatim-star.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=*"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # The handshake succeeds (the chain is the broker's CA); the principal is cn:*, bound to nothing.
    reply = https(stack, "/v1/sys/health", who="pki-verbatim-star")
    assert reply.status == 403, reply.body
    assert "cn:*" in reply.json()["detail"]
