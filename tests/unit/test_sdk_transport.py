"""The SDK's retry and fail-over on real loopback sockets: a scripted TLS server stands in for
a broker (answers, 503/429 with Retry-After, connections cut after the request), and a free
port nobody listens on for a dead replica. Sleeps are recorded, not slept."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from broker.devstack.localca import loopback_tls
from broker.devstack.stack import free_port
from broker.sdk import AsyncClient, Client
from broker.sdk.errors import Conflict, RateLimited, TransportError, Unavailable

# What the fake broker does with one request: (status, headers, JSON body), or "cut" to close
# the connection after reading the request without answering, or "hang" to say nothing for
# HANG_SECONDS first.
Step = tuple[int, dict[str, str], Any] | str

HANG_SECONDS = 4.0
OK: Step = (200, {}, {"ciphertext": "kb1:k:1:AA", "key_version": 1})
BUSY: Step = (
    503,
    {"Retry-After": "2"},
    {"code": "backend_unavailable", "detail": "sealed", "request_id": "r"},
)


@dataclass
class Fake:
    """A TLS HTTP/1.1 server on loopback answering from a script (then OK), recording requests."""

    port: int
    script: list[Step] = field(default_factory=list)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    connections: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def serve(cert: Path, key: Path) -> tuple[Fake, ThreadingHTTPServer]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    fake = Fake(0)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            fake.connections += 1
            super().setup()

        def _any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            fake.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
            step = fake.script.pop(0) if fake.script else OK
            if step in ("cut", "hang"):
                if step == "hang":
                    time.sleep(HANG_SECONDS)  # a broker that stopped answering, connection open
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            assert not isinstance(step, str)
            status, headers, body = step
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json"}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    fake.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return fake, server


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Path, Path]:
    return loopback_tls(tmp_path / "tls")


@pytest.fixture
def fakes(tls: tuple[Path, Path, Path]) -> Iterator[tuple[Fake, Fake]]:
    _, cert, key = tls
    a, server_a = serve(cert, key)
    b, server_b = serve(cert, key)
    try:
        yield a, b
    finally:
        for server in (server_a, server_b):
            server.shutdown()
            server.server_close()


def client(tls: tuple[Path, Path, Path], *urls: str, sleeps: list[float], **options: Any) -> Client:
    ca, cert, key = tls
    kb = Client(list(urls), ca_cert=ca, client_cert=cert, client_key=key, timeout=5, **options)
    kb._transport._sleep = sleeps.append
    return kb


def test_a_dead_first_address_fails_over_and_the_good_one_sticks(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """Refused on the first address: the second answers, and later calls go there first (no pause)."""
    _, live = fakes
    dead = f"https://127.0.0.1:{free_port()}"
    sleeps: list[float] = []
    with client(tls, dead, live.url, sleeps=sleeps) as kb:
        first = kb.encrypt("k", b"x")
        assert kb.address == live.url
        kb.encrypt("k", b"y")
        kb.get_key("k")

    assert first.key == "k"
    assert first.key_version == 1
    assert len(live.requests) == 3
    assert live.connections == 1  # kept alive and reused
    assert sleeps == []


def test_503_is_retried_elsewhere_then_after_retry_after(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """A safe call meeting 503 on both replicas waits at least Retry-After, then succeeds."""
    a, b = fakes
    a.script = [BUSY]
    b.script = [BUSY]
    sleeps: list[float] = []
    with client(tls, a.url, b.url, sleeps=sleeps) as kb:
        sealed = kb.encrypt("k", b"x")

    assert sealed.ciphertext == "kb1:k:1:AA"
    assert len(sleeps) == 1
    assert sleeps[0] >= 2.0
    assert (len(a.requests), len(b.requests)) == (2, 1)


def test_retries_are_bounded_and_the_broker_error_is_raised(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """429 every time: retries+1 attempts, pauses between them, then RateLimited (not a transport error)."""
    a, _ = fakes
    a.script = [(429, {}, {"code": "rate_limited", "detail": "slow down", "request_id": "r"})] * 10
    sleeps: list[float] = []
    with client(tls, a.url, sleeps=sleeps, retries=2, backoff=0.01) as kb, pytest.raises(RateLimited):
        kb.list_keys()

    assert len(a.requests) == 3
    assert len(sleeps) == 2


def test_an_unsafe_change_is_never_retried_after_503_or_a_cut_connection(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """PATCH/suspend without an idempotency key: 503 comes back as is; a lost answer says the change
    may have happened; neither is repeated on the other replica."""
    a, b = fakes
    a.script = [BUSY, "cut"]
    sleeps: list[float] = []
    with client(tls, a.url, b.url, sleeps=sleeps) as kb:
        with pytest.raises(Unavailable):
            kb.update_key("k", description="x")
        with pytest.raises(TransportError, match="may have been carried out"):
            kb.suspend_key("k")

    assert len(a.requests) == 2
    assert b.requests == []
    assert sleeps == []


def test_a_cut_connection_on_a_read_moves_to_the_next_replica(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """Reset after the request went out: a read/crypto call is sent again to the next address."""
    a, b = fakes
    a.script = ["cut"]
    b.script = [(200, {}, {"plaintext": "eA=="})]
    sleeps: list[float] = []
    with client(tls, a.url, b.url, sleeps=sleeps) as kb:
        assert kb.decrypt("k", "kb1:k:1:AA") == b"x"

    assert len(a.requests) == 1
    assert len(b.requests) == 1
    assert b.requests[0][1] == "/v1/keys/k/decrypt"


def test_a_hung_keep_alive_connection_costs_one_timeout_then_the_next_replica_answers(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """A reused connection that times out is not tried again on a fresh one at the same address
    (a hung broker would cost a second timeout): the read goes to the next replica."""
    a, b = fakes
    ca, cert, key = tls
    b.script = [(200, {}, {"plaintext": "eA=="})]
    with Client([a.url, b.url], ca_cert=ca, client_cert=cert, client_key=key, timeout=1) as kb:
        kb.encrypt("k", b"x")  # leaves a keep-alive connection to a in the pool
        a.script = ["hang"]
        assert kb.decrypt("k", "kb1:k:1:AA") == b"x"

    assert len(a.requests) == 2  # the encrypt and the hung decrypt, no third try
    assert len(b.requests) == 1


def test_rotate_carries_an_idempotency_key_and_is_retried_with_the_same_one(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """rotate_key sends Idempotency-Key; after a cut it is retried elsewhere with the SAME key;
    with idempotent_retries off it is not retried."""
    a, b = fakes
    a.script = ["cut", "cut"]
    sleeps: list[float] = []
    with client(tls, a.url, b.url, sleeps=sleeps) as kb:
        kb.rotate_key("k")
    sent = [r[2].get("idempotency-key") for r in a.requests[:1] + b.requests[:1]]

    assert len(set(sent)) == 1
    assert sent[0]
    assert sent[0].startswith("kb-")
    with (
        client(tls, a.url, b.url, sleeps=sleeps, idempotent_retries=False) as kb,
        pytest.raises(TransportError),
    ):
        kb.rotate_key("k")
    assert len(b.requests) == 1


def test_an_idempotency_key_in_progress_is_waited_for(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """409 idempotency_in_progress on a keyed create: tried again after a pause; plain 409 is raised."""
    a, _ = fakes
    busy = (
        409,
        {"Retry-After": "1"},
        {"code": "idempotency_in_progress", "detail": "wait", "request_id": "r"},
    )
    a.script = [busy, (201, {}, {"name": "k"}), (409, {}, {"code": "conflict", "detail": "exists"})]
    sleeps: list[float] = []
    with client(tls, a.url, sleeps=sleeps) as kb:
        assert kb.create_key("k", backend="vault", environment="dev") == {"name": "k"}
        with pytest.raises(Conflict):
            kb.create_key("k", backend="vault", environment="dev")

    assert sleeps
    assert sleeps[0] >= 1.0
    assert len(a.requests) == 3


def test_no_address_answering_names_every_one(tls: tuple[Path, Path, Path]) -> None:
    """Every address refused: one TransportError naming each address, after bounded rounds."""
    dead = [f"https://127.0.0.1:{free_port()}" for _ in range(2)]
    sleeps: list[float] = []
    with client(tls, *dead, sleeps=sleeps, retries=2) as kb, pytest.raises(TransportError) as caught:
        kb.health()

    assert all(url in str(caught.value) for url in dead)
    assert len(sleeps) == 2


def test_async_client_fails_over_retries_and_keeps_unsafe_calls_unrepeated(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """The asyncio client follows the same rules: dead address skipped, 503 retried after
    Retry-After, an unsafe change's 503 returned as is."""
    a, _ = fakes
    ca, cert, key = tls
    dead = f"https://127.0.0.1:{free_port()}"
    a.script = [BUSY, BUSY, OK, BUSY]
    sleeps: list[float] = []

    async def record(seconds: float) -> None:
        sleeps.append(seconds)

    async def run() -> None:
        async with AsyncClient([dead, a.url], ca_cert=ca, client_cert=cert, client_key=key, timeout=5) as kb:
            kb._transport._sleep = record
            sealed = await kb.encrypt("k", b"x")
            assert sealed.key_version == 1
            assert kb.address == a.url
            with pytest.raises(Unavailable):
                await kb.suspend_key("k")

    asyncio.run(run())

    assert len(sleeps) == 2
    assert min(sleeps) >= 2.0
    assert [r[1] for r in a.requests] == ["/v1/keys/k/encrypt"] * 3 + ["/v1/keys/k/suspend"]


def test_the_cli_sends_an_idempotency_key_on_create_and_rotate_only(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """`keys create` and `keys rotate` carry a fresh Idempotency-Key each; `keys suspend` none."""
    from broker.cli import main

    a, _ = fakes
    ca, cert, key = tls
    a.script = [(201, {}, {"name": "k"}), (200, {}, {"name": "k"}), (200, {}, {"name": "k"})]
    conn = [
        "--addr",
        a.url,
        "--ca-cert",
        str(ca),
        "--client-cert",
        str(cert),
        "--client-key",
        str(key),
        "--json",
    ]
    for argv in (
        ["keys", "create", "k", "--backend", "vault", "--environment", "dev"],
        ["keys", "rotate", "k"],
        ["keys", "suspend", "k"],
    ):
        assert main([*argv, *conn]) == 0

    sent = {path: headers.get("idempotency-key") for _, path, headers in a.requests}
    assert set(sent) == {"/v1/keys", "/v1/keys/k/rotate", "/v1/keys/k/suspend"}
    assert sent["/v1/keys"]
    assert sent["/v1/keys/k/rotate"]
    assert sent["/v1/keys"] != sent["/v1/keys/k/rotate"]
    assert sent["/v1/keys/k/suspend"] is None
