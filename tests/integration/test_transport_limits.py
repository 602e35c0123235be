"""The transport edge on the real stack: malformed HTTP, body and header limits, timeouts, the
connection cap and plain-http backends.

Each malformed request goes over a raw mutual-TLS socket (no HTTP client would send it) and
must come back as problem+json with exactly one audit record naming the certificate's
principal. The timeout and cap tests run against extra broker processes with small limits
set through KEYBROKER__SERVER__* overrides, so they finish in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.devstack.stack import DevStack, free_port
from tests.integration.conftest import extra_broker

APP = "spiffe://keybroker.dev/app/app"
ADMIN = "spiffe://keybroker.dev/user/admin"


def audit_records(directory: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        out.extend(json.loads(line) for line in path.read_bytes().splitlines())
    return out


def records_for(directory: Path, request_id: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(directory) if r.get("request_id") == request_id]


def tls_exchange(
    port: int,
    ctx: ssl.SSLContext,
    data: bytes,
    *,
    dribble: bytes = b"",
    every: float = 0.3,
    limit: float = 15,
) -> tuple[bytes, float]:
    """Send ``data`` (then ``dribble`` one byte every ``every`` s); return all that came back and when."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=limit) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        started = time.monotonic()
        tls.sendall(data)
        got = bytearray()
        first = limit
        pending = list(dribble)
        tls.settimeout(every if pending else limit)
        while time.monotonic() - started < limit:
            try:
                chunk = tls.recv(65536)
            except TimeoutError:
                if pending:
                    tls.sendall(bytes([pending.pop(0)]))
                    if not pending:
                        tls.settimeout(limit)
                continue
            except (ssl.SSLError, OSError):
                break
            if not chunk:
                break
            if not got:
                first = time.monotonic() - started
            got += chunk
        # The broker closes soon after answering (it drains an unread body for at most 2 s).
        assert time.monotonic() - started < first + 5, "the connection stayed open after the answer"
        return bytes(got), first


async def connect(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")


async def shut(writer: asyncio.StreamWriter) -> None:
    """Close without waiting on the peer's TLS goodbye (it may be gone already)."""
    writer.transport.abort()
    with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2)


def parse(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.fixture(scope="module")
def tight(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, int]]:
    """A broker with small limits and short timeouts: (port, audit directory, pid)."""
    yield from _broker(
        stack,
        tmp_path_factory,
        "broker-tight",
        MAX_CONNECTIONS="300",
        IDLE_TIMEOUT_SECONDS="3",
        HEADER_TIMEOUT_SECONDS="1",
        BODY_TIMEOUT_SECONDS="1",
        TLS_HANDSHAKE_TIMEOUT_SECONDS="1",
        MAX_BODY_BYTES="4096",
    )


@pytest.fixture(scope="module")
def capped(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path, int]]:
    """A broker that takes at most 40 connections and lets idle ones stay a while."""
    yield from _broker(
        stack, tmp_path_factory, "broker-capped", MAX_CONNECTIONS="40", IDLE_TIMEOUT_SECONDS="60"
    )


def _broker(
    stack: DevStack, tmp_path_factory: pytest.TempPathFactory, name: str, **server: str
) -> Iterator[tuple[int, Path, int]]:
    env = {f"KEYBROKER__SERVER__{key}": value for key, value in server.items()}
    with extra_broker(stack, tmp_path_factory.mktemp(name), name, env=env) as broker:
        yield broker.port, broker.audit_dir, broker.child.pid


MALFORMED = {
    "path longer than a line": b"GET /v1/keys/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "header line too long": b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"b" * 9000 + b"\r\n\r\n",
    "too many headers": b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(100))
    + b"\r\n",
    "raw UTF-8 in the path": "GET /v1/keys/caf\u00e9 HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "NUL in the path": b"GET /v1/keys/a\x00b HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad method": b"G(T /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n",
    "negative Content-Length": b"POST /v1/keys/k/encrypt HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "bad chunk size": b"POST /v1/keys/k/encrypt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nab\r\n0\r\n\r\n",
    "not HTTP at all": b"\x16\x03\x01 definitely not http\r\n\r\n",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_request_the_http_parser_refuses_is_problem_json_with_one_audit_record(
    stack: DevStack, kind: str
) -> None:
    """aiohttp's parser refusals: 400 problem+json with a request id, one record naming the principal."""
    answer, elapsed = tls_exchange(stack.broker_port, stack.client_ssl("app"), MALFORMED[kind])

    status, headers, body = parse(answer)
    assert status == 400
    assert headers["content-type"].startswith("application/problem+json")
    assert body["code"] == "bad_request"
    assert body["request_id"] == headers["x-request-id"]
    assert "aaaa" not in body["detail"]
    assert "bbbb" not in body["detail"]
    assert elapsed < 5
    [record] = records_for(stack.layout.audit_dir, body["request_id"])
    assert (record["principal"], record["status"], record["route"], record["method"]) == (
        APP,
        400,
        "unparsed",
        "other",
    )
    assert record["error"]["code"] == "bad_request"


def test_a_header_sent_too_slowly_gets_408_and_a_record(
    tight: tuple[int, Path, int], stack: DevStack
) -> None:
    """A header dribbled a byte at a time is cut off with 408 once header_timeout_seconds (1 s) passes."""
    port, audit_dir, _ = tight
    answer, elapsed = tls_exchange(
        port,
        stack.client_ssl("app"),
        b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n",
        dribble=b"X-Slow: " + b"s" * 60 + b"\r\n\r\n",
    )

    status, headers, body = parse(answer)
    assert (status, body["code"]) == (408, "request_timeout")
    assert headers["content-type"].startswith("application/problem+json")
    assert elapsed < 4
    [record] = records_for(audit_dir, body["request_id"])
    assert (record["principal"], record["status"]) == (APP, 408)


def test_a_body_sent_too_slowly_gets_408_and_a_record(tight: tuple[int, Path, int], stack: DevStack) -> None:
    """A declared body that stops arriving is answered 408 once body_timeout_seconds (1 s) passes."""
    port, audit_dir, _ = tight
    # Key creation reads its body first (the name is in it), and the administrator may create.
    answer, elapsed = tls_exchange(
        port,
        stack.client_ssl("admin"),
        b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"name": ',
    )

    status, headers, body = parse(answer)
    assert (status, body["code"]) == (408, "request_timeout")
    assert headers["content-type"].startswith("application/problem+json")
    assert elapsed < 4
    [record] = records_for(audit_dir, body["request_id"])
    assert (record["principal"], record["status"], record["route"]) == (ADMIN, 408, "/v1/keys")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_gets_413_at_once(
    tight: tuple[int, Path, int], stack: DevStack, chunked: bool
) -> None:
    """A body over max_body_bytes (4096 here) is refused with 413, declared or chunked, with a record."""
    port, audit_dir, _ = tight
    payload = b"{" + b" " * 6000 + b"}"
    if chunked:
        head = b"Transfer-Encoding: chunked\r\n\r\n"
        data = head + b"%x\r\n" % len(payload) + payload + b"\r\n0\r\n\r\n"
    else:
        data = b"Content-Length: %d\r\n\r\n" % len(payload) + payload
    answer, elapsed = tls_exchange(
        port,
        stack.client_ssl("admin"),
        b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + data,
    )

    status, headers, body = parse(answer)
    assert (status, body["code"]) == (413, "payload_too_large")
    assert headers["content-type"].startswith("application/problem+json")
    assert elapsed < 4
    assert len(records_for(audit_dir, body["request_id"])) == 1


def test_idle_and_slow_header_connections_are_closed_in_time(
    tight: tuple[int, Path, int], stack: DevStack
) -> None:
    """200 held connections (110 idle, 90 dribbling a header) are all closed by the broker within bounds.

    Idle ones close after idle_timeout_seconds (3 s) without an answer; dribbling ones get 408 after
    header_timeout_seconds (1 s). The broker still answers afterwards.
    """
    port, _, _ = tight
    ctx = stack.client_ssl("app")

    async def hold(dribble: bool) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        started = time.monotonic()
        if dribble:
            writer.write(b"GET /v1/sys/health HTTP/1.1\r\n")
        got = b""
        try:
            while time.monotonic() - started < 20:
                try:
                    chunk = await asyncio.wait_for(reader.read(4096), 0.4)
                except TimeoutError:
                    if dribble:
                        writer.write(b"X")
                    continue
                if not chunk:
                    break
                got += chunk
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            await shut(writer)
        return time.monotonic() - started, got

    async def scenario() -> list[tuple[float, bytes]]:
        return await asyncio.gather(*(hold(i < 90) for i in range(200)))

    results = asyncio.run(scenario())
    dribblers, idle = results[:90], results[90:]
    assert all(elapsed < 6 for elapsed, _ in idle), max(e for e, _ in idle)
    assert all(got == b"" for _, got in idle)
    assert all(elapsed < 5 for elapsed, _ in dribblers), max(e for e, _ in dribblers)
    # A dribbler writing its next byte just as the broker closes can get a reset that discards
    # the 408 in flight (how many depends on the machine's load), so this counts only that
    # 408s are what arrives and that nothing else does; the single-connection test above
    # checks the answer itself.
    answered = [got for _, got in dribblers if got.startswith((b"HTTP/1.0 408", b"HTTP/1.1 408"))]
    assert answered, [got[:20] for _, got in dribblers]
    assert all(got == b"" or got.startswith((b"HTTP/1.0 408", b"HTTP/1.1 408")) for _, got in dribblers)
    answer, _ = tls_exchange(
        port, ctx, b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", limit=10
    )
    assert answer.startswith(b"HTTP/1.1 200")


def test_an_unfinished_tls_handshake_is_closed_in_time(tight: tuple[int, Path, int]) -> None:
    """A TCP connection that never starts TLS is closed after tls_handshake_timeout_seconds (1 s)."""
    port, _, _ = tight
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        started = time.monotonic()
        try:
            got = sock.recv(100)
        except ConnectionResetError:
            got = b""
        assert got == b""
        assert time.monotonic() - started < 5


def test_connections_beyond_the_cap_are_closed_unanswered(
    capped: tuple[int, Path, int], stack: DevStack
) -> None:
    """With max_connections=40 the 41st connection is closed at once (at accept, before its TLS
    handshake: the broker counts connections from accept); once one leaves, a new one is served."""
    port, _, _ = capped
    ctx = stack.client_ssl("app")

    async def scenario() -> tuple[bytes, float, bytes]:
        held = [await connect(port, ctx) for _ in range(40)]
        # One request each: every held connection is past its handshake and being served.
        for reader, writer in held:
            writer.write(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        started = time.monotonic()
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
            )
        except (ConnectionError, ssl.SSLError):
            refused = b""  # closed at accept: the handshake never completed
        else:
            writer.write(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                refused = await asyncio.wait_for(reader.read(100), 10)
            except (ConnectionError, ssl.SSLError):
                refused = b""
            await shut(writer)
        took = time.monotonic() - started
        await shut(held[0][1])
        await asyncio.sleep(0.5)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        writer.write(b"GET /v1/sys/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        served = await asyncio.wait_for(reader.read(100), 10)
        await shut(writer)
        for _, w in held[1:]:
            await shut(w)
        return refused, took, served

    refused, took, served = asyncio.run(scenario())
    assert refused == b""
    assert took < 3
    assert served.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("section", ["vault", "kms"])
def test_a_plain_http_backend_is_refused_at_start_without_the_flag(
    stack: DevStack, tmp_path: Path, section: str
) -> None:
    """The dev config without its allow_insecure_http: the broker refuses to start, naming the key."""
    text = stack.render_broker_config(port=free_port())
    if section == "vault" and stack.vault_tls:
        pytest.fail("this test expects the dev Vault on plain http")
    lines = text.splitlines(keepends=True)
    out, current = [], ""
    for line in lines:
        header = re.fullmatch(r"\[(\w+)\]\s*", line)
        if header:
            current = header.group(1)
        if current == section and line.startswith("allow_insecure_http"):
            continue
        out.append(line)
    config = tmp_path / "broker.toml"
    config.write_text("".join(out))

    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(Path.cwd()))}
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(config)],
        capture_output=True,
        timeout=60,
        env=env,
        check=False,
    )

    key = "vault.address" if section == "vault" else "kms.endpoint"
    assert result.returncode != 0
    assert f"{key}: refusing plain http" in result.stderr.decode() + result.stdout.decode()
