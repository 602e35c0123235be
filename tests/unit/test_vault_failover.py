"""The broker's Vault client across several nodes: which failures move a call to another node,
which calls may be repeated after a node may have done them, and the deadline on every call."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web

from broker.backends.vault import VaultClient
from broker.config.load import load_config
from broker.config.model import VaultConfig
from broker.errors import ConfigError, OutcomeUnknown, Unavailable

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeNode:
    """One fake Vault node on loopback; counts the calls to the path under test."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.calls = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/login"):
            return web.json_response(
                {"auth": {"client_token": "t", "lease_duration": 3600, "renewable": True}}
            )
        self.calls += 1
        return await self.answer(request)


def ok(data: dict[str, object]) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"request_id": "r", "data": data})

    return answer


def vault_error(status: int, *errors: str) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"errors": list(errors)}, status=status)

    return answer


def hang(seconds: float) -> Handler:
    async def answer(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.json_response({"data": {}})

    return answer


@asynccontextmanager
async def cluster(tmp_path: Path, *nodes: FakeNode | None, **settings: float) -> AsyncIterator[VaultClient]:
    """A client whose addresses are the fake nodes (None: a port nobody listens on), in that order."""
    runners, urls = [], []
    for node in nodes:
        if node is None:
            urls.append(f"http://127.0.0.1:{_closed_port()}")
            continue
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", node.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        urls.append(f"http://127.0.0.1:{port}")
    (tmp_path / "role-id").write_text("role\n")
    (tmp_path / "secret-id").write_text("secret\n")
    config = VaultConfig(
        address=urls[0],
        addresses=tuple(urls),
        role_id_file=tmp_path / "role-id",
        secret_id_file=tmp_path / "secret-id",
        allow_insecure_http=True,
        **settings,  # type: ignore[arg-type]
    )
    client = VaultClient(config)
    await client.start()
    try:
        yield client
    finally:
        await client.close()
        for runner in runners:
            await runner.cleanup()


def test_a_refused_connection_moves_every_call_to_the_next_node(tmp_path: Path) -> None:
    """Node 1 is down (connection refused): even a write goes to node 2 (nothing was done), and node 2
    stays the node calls go to first."""

    async def run() -> None:
        second = FakeNode(ok({"version": 1}))
        async with cluster(tmp_path, None, second) as client:
            assert (await client.request("POST", "v1/kb-kv/data/x", {}, what="write"))["data"] == {
                "version": 1
            }
            assert client.current_node.endswith(str(second_port(client)))
            await client.request("GET", "v1/kb-kv/data/x", what="read")
            assert second.calls == 2

    def second_port(client: VaultClient) -> str:
        return client.nodes[1].rsplit(":", 1)[1]

    asyncio.run(run())


def test_a_standby_without_a_leader_and_a_sealed_node_are_passed_over(tmp_path: Path) -> None:
    """500 "active cluster node not found" and 503 sealed did nothing: the call goes on to a serving node."""

    async def run() -> None:
        standby = FakeNode(vault_error(500, "local node not active but active cluster node not found"))
        sealed = FakeNode(vault_error(503, "Vault is sealed"))
        active = FakeNode(ok({"v": 1}))
        async with cluster(tmp_path, standby, sealed, active) as client:
            await client.request("POST", "v1/kb-transit/keys/k/rotate", {}, what="transit rotate")
            assert (standby.calls, sealed.calls, active.calls) == (1, 1, 1)

    asyncio.run(run())


def test_after_a_timeout_only_a_repeatable_call_is_sent_to_another_node(tmp_path: Path) -> None:
    """A node that takes the call and never answers may have done it: a rotation fails fast with 504
    outcome_unknown (not a 503 a client would retry) and is not sent on; an encryption
    (repeatable) is sent to the next node once."""

    async def run() -> None:
        frozen = FakeNode(hang(3))
        spare = FakeNode(ok({"ciphertext": "c"}))
        async with cluster(tmp_path, frozen, spare, timeout_seconds=0.5, deadline_seconds=3.0) as client:
            started = time.monotonic()
            with pytest.raises(OutcomeUnknown) as unknown:
                await client.request("POST", "v1/kb-transit/keys/k/rotate", {}, what="transit rotate")
            assert (unknown.value.status, unknown.value.code) == (504, "outcome_unknown")
            assert time.monotonic() - started < 2.0
            assert spare.calls == 0
            client._resting.clear()
            client._current = 0
            out = await client.request(
                "POST", "v1/kb-transit/encrypt/k", {}, what="transit encrypt", repeatable=True
            )
            assert out["data"] == {"ciphertext": "c"}
            assert (frozen.calls, spare.calls) == (2, 1)

    asyncio.run(run())


def test_every_call_ends_by_its_deadline_when_every_node_hangs(tmp_path: Path) -> None:
    """Three frozen nodes: a repeatable call is tried on two of them (once more after the first), and
    the caller has a 503 by the deadline, not after three timeouts."""

    async def run() -> None:
        nodes = [FakeNode(hang(3)) for _ in range(3)]
        async with cluster(tmp_path, *nodes, timeout_seconds=1.0, deadline_seconds=1.5) as client:
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await client.request("GET", "v1/kb-kv/data/x", what="read")
            assert time.monotonic() - started < 2.5
            assert sum(n.calls for n in nodes) == 2

    asyncio.run(run())


def test_an_election_costs_time_not_an_error(tmp_path: Path) -> None:
    """While no node is active every node refuses; the call goes round again until one serves."""

    async def run() -> None:
        elected_at = time.monotonic() + 0.8

        async def answer(request: web.Request) -> web.StreamResponse:
            if time.monotonic() < elected_at:
                return web.json_response(
                    {"errors": ["local node not active but active cluster node not found"]}, status=500
                )
            return web.json_response({"data": {"ok": True}})

        nodes = [FakeNode(answer) for _ in range(3)]
        async with cluster(tmp_path, *nodes, deadline_seconds=5.0) as client:
            out = await client.request("POST", "v1/kb-kv/data/x", {}, what="write")
            assert out["data"] == {"ok": True}
            assert sum(n.calls for n in nodes) > 3

    asyncio.run(run())


def _write_config(tmp_path: Path, vault_lines: str) -> Path:
    (tmp_path / "c.pem").write_text("x")
    path = tmp_path / "broker.toml"
    path.write_text(
        f"""
[server]
cert_file = "c.pem"
key_file = "c.pem"
client_ca_file = "c.pem"
[vault]
role_id_file = "r"
secret_id_file = "s"
{vault_lines}
[hsm]
library = "/lib.so"
token_label = "t"
pin_file = "p"
[audit]
directory = "a"
"""
    )
    return path


def test_config_lists_nodes_once_address_first(tmp_path: Path) -> None:
    """vault.addresses adds nodes to vault.address; each node once, trailing slashes ignored."""
    path = _write_config(
        tmp_path,
        'address = "https://v2:8200"\naddresses = ["https://v1:8200/", "https://v2:8200", "https://v3:8200"]',
    )
    assert load_config(path).vault.nodes == ("https://v2:8200", "https://v1:8200", "https://v3:8200")


@pytest.mark.parametrize(
    ("lines", "key"),
    [
        ('address = "https://v1"\naddresses = ["http://v2"]', "vault.address"),
        ('address = "https://v1"\ntimeout_seconds = 5.0\ndeadline_seconds = 2.0', "vault.deadline_seconds"),
        ('address = "https://v1"\nnode_retry_seconds = 0', "vault.node_retry_seconds"),
    ],
    ids=["plain-http-node", "deadline-below-timeout", "no-rest"],
)
def test_config_refuses_unsafe_node_settings(tmp_path: Path, lines: str, key: str) -> None:
    """A plain-http node, a deadline shorter than one attempt or no rest for a failed node is refused."""
    with pytest.raises(ConfigError) as caught:
        load_config(_write_config(tmp_path, lines), environ={})
    assert caught.value.key == key


class LoginAnswers:
    """AppRole logins answered from a script (short, non-renewable tokens, so the renewer logs in
    again every few hundred ms); the last answer repeats."""

    def __init__(self, *leases: object) -> None:
        self.leases = list(leases)
        self.calls = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/revoke-self"):
            return web.Response(status=204)
        lease = self.leases[min(self.calls, len(self.leases) - 1)]
        self.calls += 1
        return web.json_response({"auth": {"client_token": f"t{self.calls}", "lease_duration": lease}})


def test_the_token_renewer_outlives_a_login_answer_it_cannot_read(tmp_path: Path) -> None:
    """A login answered with a lease_duration that is not a number made the renewer task end on a
    ValueError (no token was renewed again; every request then logged in on its own 403). Now that
    answer is a 502 the renewer logs, and it logs in again after its back-off."""

    async def run() -> None:
        node = LoginAnswers(1, "soon", 1)
        async with cluster(tmp_path, cast(FakeNode, node)) as client:
            for _ in range(100):
                if node.calls >= 4:
                    break
                await asyncio.sleep(0.1)
            assert node.calls >= 4, f"{node.calls} logins: the renewer stopped"
            assert client.logins >= 3, "a login after the unreadable answer did not count"

    asyncio.run(run())
