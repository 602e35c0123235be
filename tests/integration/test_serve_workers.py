"""`keybroker serve --workers 2` on the real stack: both workers answer on one port, each writes and
verifies its own chain, a worker killed -9 is restarted and its chain notes the cut, SIGTERM stops all."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.devstack.common import child_env, free_port
from broker.devstack.processes import Child, pid_alive, spawn
from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker
from tests.integration.conftest import https
from tests.integration.keyops import b64, unique

pytestmark = pytest.mark.integration


class Workers:
    def __init__(self, child: Child, url: str, audit_dir: Path) -> None:
        self.child, self.url, self.audit_dir = child, url, audit_dir

    def health(self, stack: DevStack) -> dict[str, Any]:
        reply = https(stack, "/v1/sys/health", url=self.url)
        assert reply.status == 200, reply.body
        worker: dict[str, Any] = reply.json()["worker"]
        return worker

    def answering(self, stack: DevStack, tries: int = 200) -> dict[int, dict[str, Any]]:
        """Each worker index seen answering health (new connection each time), within ``tries``."""
        seen: dict[int, dict[str, Any]] = {}
        for _ in range(tries):
            try:
                worker = self.health(stack)
            except OSError:
                time.sleep(0.1)  # a restarting worker's socket may refuse one connection
                continue
            seen[worker["index"]] = worker
            if len(seen) == 2:
                break
        return seen


@pytest.fixture
def workers(stack: DevStack, tmp_path: Path) -> Iterator[Workers]:
    port = free_port()
    config = tmp_path / "broker.toml"
    config.write_text(stack.render_broker_config(port=port))
    audit_dir = Path(tomllib.loads(config.read_text())["audit"]["directory"])
    child = spawn(
        "broker-workers",
        [sys.executable, "-m", "broker", "serve", "--config", str(config), "--workers", "2"],
        log_path=tmp_path / "workers.log",
        env=child_env(SOFTHSM2_CONF=str(stack.layout.softhsm_conf), **stack.broker.env),
    )
    url = f"https://127.0.0.1:{port}"
    try:
        stack.wait_healthy(child, url, timeout=90)
        yield Workers(child, url, audit_dir)
    finally:
        child.stop(timeout=30)


def records(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for p in sorted(directory.glob("audit-*.jsonl"))
        for line in p.read_bytes().splitlines()
    ]


def verify_offline(directory: Path) -> dict[str, Any]:
    out = keybroker(None, "audit", "verify", "--dir", str(directory), "--allow-unanchored", "--json")
    assert out.returncode == 0, out.stderr
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def test_two_workers_share_the_port_and_each_keeps_its_chain(stack: DevStack, workers: Workers) -> None:
    """Requests land on both workers; each has its own node, pid and intact chain (verified by the
    broker with its HSM key and Vault anchor); a kill -9 of one is healed by the parent, whose new
    process notes the cut in that chain; SIGTERM to the parent stops both, each chain intact."""
    seen = workers.answering(stack)
    assert sorted(seen) == [0, 1], seen
    assert {w["count"] for w in seen.values()} == {2}
    assert seen[0]["pid"] != seen[1]["pid"]
    port = workers.url.rsplit(":", 1)[1]
    assert [seen[i]["node"] for i in (0, 1)] == [f"broker-{port}-w0", f"broker-{port}-w1"]

    name = unique("wk")
    created = https(
        stack, "/v1/keys", url=workers.url, body={"name": name, "backend": "vault", "environment": "dev"}
    )
    assert created.status == 201, created.body
    for _ in range(20):  # new connections: spread over both workers
        sealed = https(
            stack, f"/v1/keys/{name}/encrypt", url=workers.url, body={"plaintext": b64(b"x"), "context": {}}
        )
        assert sealed.status == 200, sealed.body

    # Whichever worker answers verifies every worker's chain, each against its own node's HSM key
    # and Vault anchor; the merged timeline holds both chains' records.
    nodes = sorted(w["node"] for w in seen.values())
    report = https(stack, "/v1/audit/verify", url=workers.url).json()
    assert sorted(c["node"] for c in report["chains"]) == nodes
    assert all(c["ok"] and c["records"] > 0 and c["problems"] == 0 for c in report["chains"]), report
    assert report["ok"] is True
    timeline = https(stack, "/v1/audit/events?limit=10000&source=broker", url=workers.url).json()["events"]
    assert {row.get("chain") for row in timeline} == set(nodes)
    assert {p.name for p in workers.audit_dir.iterdir() if p.is_dir()} >= {"worker-0", "worker-1"}

    # kill -9 one worker: the parent starts a new process for the same index (bounded wait).
    victim = seen[1]["pid"]
    os.kill(victim, signal.SIGKILL)
    replaced: dict[str, Any] | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and replaced is None:
        again = workers.answering(stack, tries=20)
        if 1 in again and again[1]["pid"] != victim:
            replaced = again[1]
        time.sleep(0.2)
    assert replaced is not None, workers.child.log_tail()
    assert not pid_alive(victim)
    notes = [r for r in records(workers.audit_dir / "worker-1") if r.get("type") == "resume"]
    assert any("killed by signal 9" in str(r.get("note")) for r in notes), notes

    # SIGTERM to one worker (not from its parent): it stops cleanly, is restarted, and its chain
    # says so without claiming a cut.
    victim = seen[0]["pid"]
    os.kill(victim, signal.SIGTERM)
    renewed: dict[str, Any] | None = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and renewed is None:
        again = workers.answering(stack, tries=20)
        if 0 in again and again[0]["pid"] != victim:
            renewed = again[0]
        time.sleep(0.2)
    assert renewed is not None, workers.child.log_tail()
    said = [str(r.get("note")) for r in records(workers.audit_dir / "worker-0") if r.get("type") == "resume"]
    assert any(f"(pid {victim}) stopped cleanly" in n for n in said), said
    assert not any(f"(pid {victim})" in n and "without a clean stop" in n for n in said), said

    # SIGTERM to the parent: both workers stop (bounded), and each chain verifies offline.
    pids = [renewed["pid"], replaced["pid"]]
    workers.child.process.send_signal(signal.SIGTERM)
    assert workers.child.process.wait(timeout=60) == 0
    assert not any(pid_alive(p) for p in pids)
    for index in (0, 1):
        report = verify_offline(workers.audit_dir / f"worker-{index}")
        assert report["ok"], report
        assert report["records"] > 2
