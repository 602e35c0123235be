"""Keep-alive connections: the broker reads a connection's client certificate once, yet checks
revocation on every request, and each connection keeps its own principal."""

from __future__ import annotations

import http.client
import json
import time

from cryptography import x509

from broker.devstack.stack import DevStack
from broker.vaultops.policy import Mounts
from tests.integration.keyops import unique
from tests.integration.policyops import identity

CRL_GRACE_SECONDS = 20


def connect(stack: DevStack, who: str) -> http.client.HTTPSConnection:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", stack.broker_port, context=stack.client_ssl(who), timeout=15
    )
    conn.connect()
    return conn


def get(conn: http.client.HTTPSConnection, path: str) -> tuple[int, dict[str, str], bytes]:
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, dict(resp.getheaders()), resp.read()


def test_a_certificate_revoked_mid_connection_is_refused_on_that_connection(stack: DevStack) -> None:
    """A certificate revoked in Vault PKI while its keep-alive connection stays open is refused
    401 ``certificate_revoked`` on that same connection (the cached identity is not a pass)."""
    stem, _ = identity(stack, unique("kept-alive"), "app")
    conn = connect(stack, stem)
    try:
        sock = conn.sock
        status, _, body = get(conn, "/v1/sys/health")
        assert status == 403, body  # authenticated, bound to no role
        cert = x509.load_pem_x509_certificate((stack.layout.tls / f"{stem}.crt").read_bytes())
        serial = ":".join(f"{b:02x}" for b in cert.serial_number.to_bytes(20, "big").lstrip(b"\0"))
        stack.vault_client().adapter.post(f"/v1/{Mounts().pki}/revoke", json={"serial_number": serial})
        deadline = time.monotonic() + CRL_GRACE_SECONDS
        while True:
            status, _, body = get(conn, "/v1/sys/health")
            if status == 401 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert conn.sock is sock, "the connection was reopened: the test must stay on one connection"
        assert status == 401, f"revoked certificate still served on its open connection: {status}"
        assert json.loads(body)["code"] == "certificate_revoked", body
    finally:
        conn.close()


def test_each_connection_keeps_its_own_principal(stack: DevStack) -> None:
    """Two keep-alive connections with different certificates, interleaved: every answer is
    decided for the certificate of the connection it came on."""
    admin = connect(stack, "admin")
    stranger_stem, _ = identity(stack, unique("stranger"), "app")
    stranger = connect(stack, stranger_stem)
    try:
        for _ in range(5):
            assert get(admin, "/v1/sys/health")[0] == 200
            assert get(stranger, "/v1/sys/health")[0] == 403
    finally:
        admin.close()
        stranger.close()
