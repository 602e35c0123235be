"""Red-team findings at the transport edge (4, 5, 9 and the notes), on the real stack.

Revoked client certificates, stalled TLS handshakes, ``Expect`` headers, requests without an
HTTP version and transfer-codings other than plain chunked.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509

from broker.devstack.stack import DevStack
from broker.vaultops.policy import Mounts
from tests.integration.conftest import Reply, extra_broker, https
from tests.integration.keyops import b64, create_key, unique
from tests.integration.policyops import identity

CRL_GRACE_SECONDS = 20


def raw_tls(stack: DevStack, data: bytes, who: str = "app") -> bytes:
    """Send raw bytes over an mTLS connection as ``who`` and read until the broker closes."""
    with (
        socket.create_connection(("127.0.0.1", stack.broker_port), timeout=10) as sock,
        stack.client_ssl(who).wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(data)
        out = b""
        while chunk := tls.recv(65536):
            out += chunk
        return out


def records_with(stack: DevStack, marker: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(stack.layout.audit_dir.glob("audit-*.jsonl"))
        for line in path.read_bytes().splitlines()
        if marker.encode() in line
    ]


def test_an_expect_header_other_than_100_continue_gets_problem_json_and_a_record(stack: DevStack) -> None:
    """``Expect: <anything but 100-continue>`` is answered 417 problem+json (never echoing the
    header) with exactly one audit record naming the caller, not aiohttp's text/plain 417."""
    key = create_key(stack, "vault", tags={"app": "app"})
    client_id = f"redteam-expect-{uuid.uuid4().hex}"
    body = json.dumps({"plaintext": b64(b"x")}).encode()
    answer = raw_tls(
        stack,
        (
            f"POST /v1/keys/{key}/encrypt HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: {client_id}\r\n"
            f"Expect: <script>probe</script>\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + body,
    )
    head, _, payload = answer.partition(b"\r\n\r\n")
    head_text = head.decode("latin-1")
    records = records_with(stack, client_id)
    assert len(records) == 1, f"answered {head_text.splitlines()[0]!r} with {len(records)} audit records"
    assert "application/problem+json" in head_text, head_text
    assert head_text.startswith("HTTP/1.1 417"), head_text
    assert b"<script>" not in answer
    assert json.loads(payload)["code"] == "expectation_failed"
    assert records[0]["status"] == 417, records[0]
    assert records[0]["principal"], records[0]


def test_expect_100_continue_is_not_answered_before_the_request_is_handled(stack: DevStack) -> None:
    """``Expect: 100-continue`` gets no interim 100 (the broker never sends one: the body is
    read, if at all, only once the handler decided to); the request is answered as usual."""
    key = create_key(stack, "vault", tags={"app": "app"})
    body = json.dumps({"plaintext": b64(b"x")}).encode()
    answer = raw_tls(
        stack,
        (
            f"POST /v1/keys/{key}/encrypt HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + body,
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"100 Continue" not in answer


def test_a_request_line_without_an_http_version_gets_400_problem_json_and_a_record(stack: DevStack) -> None:
    """``GET /path`` (HTTP/0.9 style, no version) is refused 400 problem+json with a record,
    not answered as "HTTP/0.9 200 OK"."""
    marker = f"nover{uuid.uuid4().hex}"
    answer = raw_tls(stack, f"GET /v1/sys/health?{marker}\r\n\r\n".encode(), who="admin")
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    assert " 400 " in head.splitlines()[0], head
    assert "application/problem+json" in head, head
    assert "HTTP/0.9" not in head, head


def test_a_transfer_coding_other_than_chunked_is_refused(stack: DevStack) -> None:
    """``Transfer-Encoding: gzip, chunked`` is refused 400 problem+json with a record instead
    of the gzip coding being silently ignored."""
    key = create_key(stack, "vault", tags={"app": "app"})
    client_id = f"redteam-te-{uuid.uuid4().hex}"
    body = json.dumps({"plaintext": b64(b"x")}).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    answer = raw_tls(
        stack,
        (
            f"POST /v1/keys/{key}/encrypt HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: {client_id}\r\n"
            f"Transfer-Encoding: gzip, chunked\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        ).encode()
        + chunked,
    )
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 400"), head
    assert "application/problem+json" in head, head
    records = records_with(stack, client_id)
    assert len(records) == 1, records
    assert records[0]["status"] == 400, records


def test_a_client_certificate_revoked_in_vault_pki_is_refused(stack: DevStack) -> None:
    """A client certificate revoked in Vault PKI (``pki/revoke``) is refused 401
    ``certificate_revoked`` within the CRL refresh interval, and the refusal is audited with
    the principal it named."""
    stem, principal = identity(stack, unique("stolen"), "app")
    before = https(stack, "/v1/sys/health", who=stem)
    assert before.status == 403, before.body  # authenticated (bound to no role): the certificate works
    cert = x509.load_pem_x509_certificate((stack.layout.tls / f"{stem}.crt").read_bytes())
    serial = ":".join(f"{b:02x}" for b in cert.serial_number.to_bytes(20, "big").lstrip(b"\0"))
    stack.vault_client().adapter.post(f"/v1/{Mounts().pki}/revoke", json={"serial_number": serial})
    crl = stack.vault_client().adapter.get(f"/v1/{Mounts().pki}/cert/crl")["data"]["certificate"]
    revoked = {r.serial_number for r in x509.load_pem_x509_crl(crl.encode())}
    assert cert.serial_number in revoked, "the certificate is not on the CA's CRL"
    deadline = time.monotonic() + CRL_GRACE_SECONDS
    while True:
        try:
            after: Reply | None = https(stack, "/v1/sys/health", who=stem)
        except OSError:
            after = None
        if after is None or after.status == 401 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert after is not None, "refused at the handshake: the refusal leaves no record"
    assert after.status == 401, (
        f"{principal}'s certificate, revoked in Vault PKI, still authenticates: {after and after.status}"
    )
    assert after.json()["code"] == "certificate_revoked", after.body
    broker_id = after.headers["X-Broker-Request-Id"]
    records = records_with(stack, broker_id)
    assert len(records) == 1, records
    assert records[0]["principal"] == principal, records
    assert https(stack, "/v1/sys/health").status == 200  # everyone else is unaffected


def test_a_broker_that_cannot_read_the_crl_fails_closed(stack: DevStack, tmp_path: Path) -> None:
    """A broker that never obtained its PKI's CRL (here: a mount with no CA) refuses every
    request 503 ``crl_unavailable`` with a detail that says so, rather than trusting every
    certificate."""
    # Not waited for: this broker never answers health 200.
    with extra_broker(
        stack,
        tmp_path,
        "broker-no-crl",
        wait=False,
        env={"KEYBROKER__SERVER__CRL_PKI_MOUNT": "kb-no-such-pki"},
    ) as broker:
        url = broker.url
        reply: Reply | None = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                reply = https(stack, "/v1/sys/health", url=url)
                break
            except OSError:
                time.sleep(0.5)
        assert reply is not None, "the broker never answered"
        assert reply.status == 503, reply.body
        assert reply.json()["code"] == "crl_unavailable", reply.body
        assert "revocation list" in reply.json()["detail"], reply.body


def test_stalled_tls_handshakes_without_a_certificate_do_not_lock_out_everyone(
    stack: DevStack, tmp_path: Path
) -> None:
    """600 TCP connections from one peer that send only a TLS record header (a 512-file limit
    set after start) neither exhaust the broker's file descriptors nor delay the administrator
    connecting from another address: handshakes in progress are capped per peer and in all."""
    prlimit = shutil.which("prlimit")
    assert prlimit is not None, "this test needs util-linux prlimit"
    held: list[socket.socket] = []
    with extra_broker(stack, tmp_path, "broker-redteam-fds") as broker:
        port, child = broker.port, broker.child
        try:
            subprocess.run([prlimit, f"--pid={child.pid}", "--nofile=512:512"], check=True)
            for _ in range(600):
                # The attacker is another host (127.0.0.2, still loopback): on one shared address the
                # per-peer cap would rightly treat the administrator as the same peer.
                sock = socket.create_connection(
                    ("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)
                )
                sock.sendall(b"\x16\x03\x01\x00\xc8")  # a TLS handshake record header; the record never comes
                held.append(sock)
            time.sleep(1)
            started = time.monotonic()
            try:
                status: int | str = https(stack, "/v1/sys/health", url=f"https://127.0.0.1:{port}").status
            except OSError as exc:
                status = repr(exc)
            took = time.monotonic() - started
            assert status == 200, f"the administrator's health check failed: {status} after {took:.1f} s"
            assert took < 3, f"the administrator's health check took {took:.1f} s behind stalled handshakes"
        finally:
            for sock in held:
                sock.close()
