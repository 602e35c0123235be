"""The edge's hooks into aiohttp still work: parser refusals, header timeout, connection cap.

broker/api/edge.py overrides ``RequestHandler.handle_error`` and queues a 408 through
aiohttp's private message queue. These tests drive a real aiohttp server (plain TCP on
loopback, a stand-in audit sink) so an aiohttp upgrade that moves either hook fails here
rather than silently bringing back text/plain answers without audit records.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import inspect
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from broker.api.edge import TLS_READ_BUFFER_BYTES, EdgeSite, bound_tls_read_buffer
from broker.api.metrics import Metrics
from broker.api.state import AUDIT, AUDIT_HMAC_KEY, METRICS
from broker.config.model import ServerConfig

if TYPE_CHECKING:
    from broker.audit.sink import AuditSink


class FakeSink:
    """Collects records as the audit sink would write them."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def check_ready(self) -> None:
        pass

    async def append(self, record: dict[str, Any]) -> int:
        self.records.append(record)
        return len(self.records)


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


async def _broken(request: web.Request) -> web.Response:
    raise RuntimeError("secret detail that must not be shown")


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[int, FakeSink, EdgeSite]]:
    """A real aiohttp server on loopback behind the edge, with small limits."""
    from broker.devstack.stack import free_port

    port = free_port()
    app = web.Application()
    sink = FakeSink()
    app[AUDIT] = cast("AuditSink", sink)
    app[AUDIT_HMAC_KEY] = b"k" * 32
    app[METRICS] = Metrics()
    app.router.add_get("/ok", _ok)
    app.router.add_get("/broken", _broken)
    app.router.add_post("/echo", _echo)
    config = ServerConfig(
        cert_file=Path("unused"),
        key_file=Path("unused"),
        client_ca_file=Path("unused"),
        port=port,
        max_connections=3,
        header_timeout_seconds=0.5,
        idle_timeout_seconds=30,
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = EdgeSite(runner, config, None)
    await site.start()
    try:
        yield port, sink, site
    finally:
        await runner.cleanup()


def test_the_overridden_aiohttp_surfaces_are_still_there() -> None:
    """handle_error keeps its signature and _ErrInfo its fields: the edge relies on both."""
    params = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert params == ["self", "request", "status", "exc", "message"]
    assert [a.name for a in _ErrInfo.__attrs_attrs__] == ["status", "exc", "message"]
    assert {"_messages", "_waiter", "_request_in_progress", "_close", "_request_factory"} <= set(
        RequestHandler.__slots__
    )
    # TlsConnection layers TLS itself (to count connections from accept) on asyncio's SSLProtocol.
    tls = list(inspect.signature(asyncio.sslproto.SSLProtocol.__init__).parameters)
    assert tls[:5] == ["self", "loop", "app_protocol", "sslcontext", "waiter"]
    assert {"server_side", "ssl_handshake_timeout"} <= set(tls)
    handshake_done = list(inspect.signature(asyncio.sslproto.SSLProtocol._on_handshake_complete).parameters)
    assert handshake_done == ["self", "handshake_exc"]


async def _exchange(port: int, data: bytes, *, wait: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), wait)
    finally:
        writer.close()


def _split(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def test_a_parser_refusal_is_problem_json_with_one_record() -> None:
    """An over-long request line gets problem+json 400 with a request id, and exactly one record."""

    async def scenario() -> None:
        async with serving() as (port, sink, _):
            answer = await _exchange(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = _split(answer)
            assert status == 400
            assert headers["content-type"].startswith("application/problem+json")
            assert body["code"] == "bad_request"
            assert body["request_id"] == headers["x-request-id"]
            assert "aaaa" not in body["detail"]
            assert [(r["request_id"], r["status"], r["route"]) for r in sink.records] == [
                (body["request_id"], 400, "unparsed")
            ]

    asyncio.run(scenario())


def test_a_stalled_header_gets_408_promptly() -> None:
    """Half a header then silence: 408 problem+json once header_timeout_seconds passes, and a record."""

    async def scenario() -> None:
        async with serving() as (port, sink, _):
            started = time.monotonic()
            answer = await _exchange(port, b"GET /ok HTTP/1.1\r\nHost: x\r\n")
            assert time.monotonic() - started < 3
            status, headers, body = _split(answer)
            assert (status, body["code"]) == (408, "request_timeout")
            assert headers["content-type"].startswith("application/problem+json")
            assert [r["status"] for r in sink.records] == [408]

    asyncio.run(scenario())


def test_connections_beyond_the_cap_are_closed() -> None:
    """With max_connections=3 a fourth connection is closed unanswered; the three still work."""

    async def scenario() -> None:
        async with serving() as (port, _, site):
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            for _ in range(50):
                if site.edge.open == 3:
                    break
                await asyncio.sleep(0.02)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await asyncio.wait_for(reader.read(100), 5) == b""
            writer.close()
            r0, w0 = held[0]
            w0.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(r0.read(100), 5)).startswith(b"HTTP/1.1 200")
            for _, w in held:
                w.close()

    asyncio.run(scenario())


def test_the_tls_read_buffer_bound_reaches_new_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio still sizes each TLS connection's read buffer from SSLProtocol.max_size, as the edge sets."""
    monkeypatch.setattr(asyncio.sslproto.SSLProtocol, "max_size", asyncio.sslproto.SSLProtocol.max_size)
    bound_tls_read_buffer()
    loop = asyncio.new_event_loop()
    try:
        proto = asyncio.sslproto.SSLProtocol(
            loop, asyncio.Protocol(), ssl.create_default_context(), loop.create_future(), server_side=False
        )
        assert len(proto.get_buffer(-1)) == TLS_READ_BUFFER_BYTES
        assert len(proto._ssl_buffer) == TLS_READ_BUFFER_BYTES  # type: ignore[attr-defined]
        proto._app_transport._closed = True  # never connected: nothing to close
    finally:
        loop.close()


def test_an_error_escaping_every_middleware_is_problem_json_with_one_record() -> None:
    """aiohttp's own 500 (an exception no middleware caught) is problem+json without the detail, audited."""

    async def scenario() -> None:
        async with serving() as (port, sink, _):
            answer = await _exchange(port, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = _split(answer)
            assert (status, body["code"]) == (500, "internal_error")
            assert headers["content-type"].startswith("application/problem+json")
            assert "secret detail" not in answer.decode()
            assert [(r["request_id"], r["status"]) for r in sink.records] == [(body["request_id"], 500)]

    asyncio.run(scenario())


def test_a_body_arriving_after_its_header_does_not_start_the_header_clock() -> None:
    """A POST whose body comes in a later packet, then an idle keep-alive: no spurious 408."""

    async def scenario() -> None:
        async with serving() as (port, sink, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"hello")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
            # Well past header_timeout_seconds (0.5 s), well before idle_timeout_seconds (30 s).
            with contextlib.suppress(TimeoutError):
                late = await asyncio.wait_for(reader.read(100), 1.5)
                raise AssertionError(f"unexpected answer on an idle connection: {late!r}")
            assert sink.records == []
            writer.close()
            await writer.wait_closed()

    asyncio.run(scenario())
