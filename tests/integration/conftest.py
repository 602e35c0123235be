"""The real local stack for integration tests: moto KMS server, OpenBao with the awskms
seal, a SoftHSM2 token and the broker, on free loopback ports in a temporary directory.

It is the same code ``keybroker dev`` runs (``broker.devstack.stack.DevStack``).
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest

from broker.devstack.processes import Child
from broker.devstack.stack import DevStack, free_port

pytestmark = pytest.mark.integration


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def https(
    stack: DevStack,
    path: str,
    *,
    who: str = "admin",
    headers: dict[str, str] | None = None,
    url: str | None = None,
    method: str | None = None,
    body: Any = None,
) -> Reply:
    """One HTTPS request to a broker with the named dev client certificate (``body`` sent as JSON)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        (url or stack.broker_url) + path,
        data=data,
        headers={**({"Content-Type": "application/json"} if data else {}), **(headers or {})},
        method=method or ("POST" if data is not None else "GET"),
    )
    try:
        with urllib.request.urlopen(request, context=stack.client_ssl(who), timeout=15) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:  # an error body cut short must not leave its socket to the collector
            return Reply(exc.code, exc.headers, exc.read())


def wait_until_healthy(stack: DevStack, timeout: float = 20) -> Reply:
    """Poll /v1/sys/health until it answers 200 (bounded); return the last reply."""
    deadline = time.monotonic() + timeout
    reply = https(stack, "/v1/sys/health")
    while reply.status != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        reply = https(stack, "/v1/sys/health")
    return reply


def raw_tls_exchange(port: int, ctx: ssl.SSLContext) -> bytes:
    """Handshake, send one HTTP request and return what came back (b'' if the server hung up)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return tls.recv(200)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    state = tmp_path_factory.mktemp("stack")
    dev = DevStack(state, broker_port=free_port())
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()


@pytest.fixture(scope="session")
def ca_file(stack: DevStack) -> Path:
    return stack.layout.tls / "ca.pem"


@dataclass(frozen=True)
class ExtraBroker:
    """One more broker process on the stack, as ``extra_broker`` started it."""

    url: str
    port: int
    config: Path
    child: Child
    audit_dir: Path  # its own audit log (one chain per node), as its config names it
    node: str


@contextmanager
def extra_broker(
    stack: DevStack,
    directory: Path,
    name: str,
    *,
    approle_dir: Path | None = None,
    extra_config: str = "",
    wait: bool = True,
    env: Mapping[str, str] | None = None,
) -> Iterator[ExtraBroker]:
    """Another broker process sharing the stack's Vault, KMS and HSM, stopped on leaving.

    It listens on a free port and is named ``<name>-<port>`` (its log in the stack's log folder,
    its config ``<directory>/<name>-<port>.toml``: the stack's rendered config, then
    ``extra_config``); ``env`` is added to its environment. With ``wait`` it is yielded once
    health answers 200; without, as soon as it is spawned (for a broker expected to refuse).
    A test that restarts it on the same config stops the new process itself.
    """
    port = free_port()
    config = directory / f"{name}-{port}.toml"
    text = stack.render_broker_config(port=port, approle_dir=approle_dir) + extra_config
    config.write_text(text)
    audit = tomllib.loads(text)["audit"]
    child = stack.spawn_broker(f"{name}-{port}", config, **(env or {}))
    broker = ExtraBroker(
        url=f"https://127.0.0.1:{port}",
        port=port,
        config=config,
        child=child,
        audit_dir=Path(audit["directory"]),
        node=audit["node"],
    )
    try:
        if wait:
            stack.wait_healthy(child, broker.url)
        yield broker
    finally:
        child.stop()


@pytest.fixture(scope="module")
def second_broker(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another broker process (its own port and audit log) sharing the stack's Vault, KMS and HSM.

    Per module, not per session: its upkeep (scheduler, grant purge) calls Vault under the broker's
    identity, and the stack's own timeline, which holds only its own records, shows those calls as
    unexplained; a module that checks for unexplained rows must not run while it lives (seen in CI).
    """
    with extra_broker(stack, tmp_path_factory.mktemp("replica"), "broker-replica") as broker:
        yield broker.url
