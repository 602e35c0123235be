"""Rotations, policy edits and grant changes through both replicas while the Vault leader moves."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from broker.devstack.stack import DevStack
from tests.integration.conftest import Reply
from tests.integration.ha.faults import create_key, request, wait_cluster_whole

pytestmark = pytest.mark.integration


@dataclass
class Outcomes:
    """What each operation answered, by a name the test chose."""

    replies: dict[str, int] = field(default_factory=dict)
    refusals: list[Reply] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, name: str, reply: Reply) -> int:
        with self.lock:
            self.replies[name] = reply.status
            if reply.status >= 300:
                self.refusals.append(reply)
        return reply.status

    def ok(self, prefix: str) -> list[str]:
        return [n for n, s in self.replies.items() if n.startswith(prefix) and 200 <= s < 300]


def _send(stack: DevStack, url: str, path: str, method: str, body: Any = None) -> Reply:
    return request(stack, url, path, body, method=method, timeout=60)


def test_admin_changes_while_the_leader_moves_lose_nothing_and_resurrect_nothing(ha: DevStack) -> None:
    """Every rotation answered 200 is a version (and a refused one at most one more), versions are
    numbered without gaps, each with its own material; every role and grant made and kept is there;
    every role and grant removed with a 200 stays gone; every refusal is a 503 problem+json."""
    assert ha.cluster is not None
    key = "ha-admin-races"
    create_key(ha, key)
    urls = [r.url for r in ha.replicas]
    out = Outcomes()
    stop = threading.Event()
    grant_ids: dict[str, str] = {}

    def rotations(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            out.note(f"rotate-{w}-{i}", _send(ha, urls[(w + i) % 2], f"/v1/keys/{key}/rotate", "POST", {}))

    def roles(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            role = f"ha-role-{w}-{i}"
            body = {"rules": [{"operations": ["key.read"]}]}
            if (
                out.note(f"put-{role}", _send(ha, urls[(w + i) % 2], f"/v1/policies/{role}", "PUT", body))
                != 200
            ):
                continue
            if i % 2 == 0:
                out.note(f"delete-{role}", _send(ha, urls[(w + i + 1) % 2], f"/v1/policies/{role}", "DELETE"))

    def grants(w: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            name = f"g-{w}-{i}"
            body = {
                "grantee": f"spiffe://keybroker.dev/app/ha-{w}-{i}",
                "operations": ["crypto.encrypt"],
                "expires_in": "1h",
            }
            reply = _send(ha, urls[(w + i) % 2], f"/v1/keys/{key}/grants", "POST", body)
            if out.note(f"create-{name}", reply) != 201:
                continue
            grant_ids[name] = reply.json()["grant_id"]
            if i % 2 == 0:
                path = f"/v1/keys/{key}/grants/{grant_ids[name]}"
                out.note(f"revoke-{name}", _send(ha, urls[(w + i + 1) % 2], path, "DELETE"))

    workers: list[Callable[[int], None]] = [rotations, roles, grants]
    threads = [threading.Thread(target=fn, args=(w,), daemon=True) for fn in workers for w in range(3)]
    for thread in threads:
        thread.start()
    moves = 0
    try:
        for _ in range(2):
            time.sleep(3)
            before = ha.cluster.leader()
            ha.cluster._root_call("PUT", "sys/step-down")
            deadline = time.monotonic() + 20
            while ha.cluster.leader() in (None, before) and time.monotonic() < deadline:
                time.sleep(0.2)
            moves += ha.cluster.leader() not in (None, before)
        time.sleep(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(90)
    assert not any(t.is_alive() for t in threads), "an operation hung"
    wait_cluster_whole(ha)
    print(f"\nleader moved {moves} times; {len(out.replies)} operations, {len(out.refusals)} refused")
    assert moves >= 1

    for reply in out.refusals:
        assert reply.status == 503, (reply.status, reply.body[:300])
        assert reply.json()["code"] == "backend_unavailable"
        assert reply.headers.get("Content-Type", "").startswith("application/problem+json")
    versions = request(ha, urls[0], f"/v1/keys/{key}").json()["versions"]
    rotated = len(out.ok("rotate-"))
    refused_rotations = sum(1 for n, s in out.replies.items() if n.startswith("rotate-") and s != 200)
    numbers = [v["version"] for v in versions]
    assert numbers == list(range(1, len(numbers) + 1))
    assert 1 + rotated <= len(numbers) <= 1 + rotated + refused_rotations
    # Each registry version is its own transit version: none recorded twice (a repeated write).
    stored = ha.vault_client().secrets.kv.v2.read_secret_version(
        path=f"keys/{key}", mount_point="kb-kv", raise_on_deleted_version=True
    )["data"]["data"]
    materials = [v["material"] for v in stored["versions"]]
    assert len(set(materials)) == len(materials) == len(numbers)

    document = request(ha, urls[1], "/v1/policies").json()["document"]
    present_roles = set(document["roles"])
    deleted = {n.removeprefix("delete-") for n in out.ok("delete-")}
    kept = {n.removeprefix("put-") for n in out.ok("put-")} - {
        n.removeprefix("delete-") for n in out.replies if n.startswith("delete-")
    }
    assert kept <= present_roles, sorted(kept - present_roles)
    assert not deleted & present_roles, sorted(deleted & present_roles)

    listed = {g["id"] for g in request(ha, urls[0], f"/v1/keys/{key}/grants").json()["grants"]}
    revoked = {grant_ids[n.removeprefix("revoke-")] for n in out.ok("revoke-")}
    made = {grant_ids[n.removeprefix("create-")] for n in out.ok("create-")}
    tried_revoke = {grant_ids[n.removeprefix("revoke-")] for n in out.replies if n.startswith("revoke-")}
    assert made - tried_revoke <= listed, sorted(made - tried_revoke - listed)
    assert not revoked & listed, sorted(revoked & listed)
