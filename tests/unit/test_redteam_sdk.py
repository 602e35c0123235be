"""Red-team checks of the SDK transport: an answer that redirects is never followed (the request
body can hold plaintext, and a redirect may point at plain HTTP or another host)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from broker.sdk import AsyncClient, Client
from broker.sdk._calls import raw
from broker.sdk._settings import parse_addresses
from broker.sdk.errors import ConfigurationError, InvalidInput, KeybrokerError
from tests.unit.test_sdk_transport import Fake, fakes, tls

__all__ = ["fakes", "tls"]  # pytest fixtures, used by name below

SECRET = b"top secret payroll line"


class _Sink:
    """A plain-HTTP listener on loopback recording every request body it is sent."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                sink.bodies.append(self.rfile.read(length))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def sink() -> Iterator[_Sink]:
    s = _Sink()
    try:
        yield s
    finally:
        s.server.shutdown()
        s.server.server_close()


def _redirects(fake: Fake, where: str) -> None:
    fake.script = [(307, {"Location": where}, {"code": "moved", "detail": "moved", "request_id": "r"})] * 8


def test_the_async_client_does_not_follow_a_redirect_to_plain_http(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake], sink: _Sink
) -> None:
    """A 307 to an http:// address: the encrypt fails, and the plaintext never leaves over plain HTTP."""
    a, _ = fakes
    _redirects(a, sink.url + "/v1/keys/k/encrypt")
    ca, cert, key = tls

    async def run() -> None:
        opts: dict[str, Any] = {"ca_cert": ca, "client_cert": cert, "client_key": key, "retries": 0}
        async with AsyncClient(a.url, timeout=5, **opts) as kb:
            with pytest.raises(KeybrokerError):
                await kb.encrypt("k", SECRET)

    asyncio.run(run())
    assert sink.bodies == []
    assert len(a.requests) == 1


def test_the_async_client_does_not_follow_a_redirect_to_another_host(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """A 307 to another TLS server: nothing is sent there (it is not one of the client's addresses)."""
    a, b = fakes
    _redirects(a, b.url + "/v1/keys/k/encrypt")
    ca, cert, key = tls

    async def run() -> None:
        opts: dict[str, Any] = {"ca_cert": ca, "client_cert": cert, "client_key": key, "retries": 0}
        async with AsyncClient(a.url, timeout=5, **opts) as kb:
            with pytest.raises(KeybrokerError):
                await kb.encrypt("k", SECRET)

    asyncio.run(run())
    assert b.requests == []


def test_the_sync_client_does_not_follow_a_redirect(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake], sink: _Sink
) -> None:
    """The blocking client, the same way: a redirect is an error, never a second request."""
    a, _ = fakes
    _redirects(a, sink.url + "/v1/keys/k/encrypt")
    ca, cert, key = tls
    with (
        Client(a.url, ca_cert=ca, client_cert=cert, client_key=key, timeout=5, retries=0) as kb,
        pytest.raises(KeybrokerError),
    ):
        kb.encrypt("k", SECRET)
    assert sink.bodies == []
    assert len(a.requests) == 1


@pytest.mark.parametrize(
    "address", ["https://ops:hunter2@broker.example:8443", "https://hunter2@broker.example"]
)
def test_an_address_with_credentials_is_refused_without_repeating_them(address: str) -> None:
    """user:password@ in a broker address is refused, and the error does not echo the password
    (every later error and log line would otherwise carry it, and aiohttp would send it)."""
    with pytest.raises(ConfigurationError) as caught:
        parse_addresses(address)
    assert "hunter2" not in str(caught.value)


def test_an_idempotency_key_on_a_route_without_records_does_not_make_a_change_retryable(
    tls: tuple[Path, Path, Path], fakes: tuple[Fake, Fake]
) -> None:
    """``call(..., idempotency_key=...)`` on a change the broker keeps no record for (a new audit
    epoch, a binding write, a grant revocation): the broker ignores the header, so a retry after
    a lost answer would make the change twice. The SDK refuses the call before sending anything."""
    a, b = fakes
    a.script = ["cut"]
    ca, cert, key = tls
    with (
        Client([a.url, b.url], ca_cert=ca, client_cert=cert, client_key=key, timeout=5, retries=1) as kb,
        pytest.raises(InvalidInput, match="no Idempotency-Key record"),
    ):
        kb.call("POST", "/v1/audit/epoch", {"name": "e2", "reason": "r"}, idempotency_key="k-1")
    assert a.requests == []
    assert b.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/keys"),
        ("PATCH", "/v1/keys/payments"),
        ("POST", "/v1/keys/payments/rotate"),
        ("POST", "/v1/keys/payments/schedule-destruction"),
        ("POST", "/v1/keys/payments/grants"),
        ("PUT", "/v1/policies"),
    ],
)
def test_an_idempotency_key_on_a_route_with_records_is_kept(method: str, path: str) -> None:
    """Where the broker keeps records, the header goes out as given (and makes the call retryable)."""
    call = raw(method, path, {"x": 1}, (), None, "k-2")
    assert call.request_headers()["Idempotency-Key"] == "k-2"
