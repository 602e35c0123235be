"""Health of the HA stack: which replica answered, the Vault nodes and the leader; the env file."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys

import pytest

from broker.devstack.stack import DevStack
from tests.integration.ha.faults import request, wait_cluster_whole

pytestmark = pytest.mark.integration


def _states(body: dict[str, object]) -> dict[str, str]:
    vault = body["vault"]
    assert isinstance(vault, dict)
    return {str(p["address"]): str(p["state"]) for p in vault["peers"]}


def test_health_names_the_replica_the_nodes_and_the_leader(ha: DevStack) -> None:
    """Each replica names itself; both list the three Vault nodes, exactly one active, and that one
    is the leader Vault reports; a killed standby shows as unreachable while the broker stays healthy."""
    assert ha.cluster is not None
    nodes = {n.addr for n in ha.cluster.nodes}
    bodies = [request(ha, r.url, "/v1/sys/health").json() for r in ha.replicas]
    assert [b["replica"] for b in bodies] == ["broker-1", "broker-2"]
    for body in bodies:
        states = _states(body)
        assert set(states) == nodes
        assert sorted(states.values()) == ["active", "standby", "standby"], states
        active = next(a for a, s in states.items() if s == "active")
        assert body["vault"]["leader_address"].rstrip("/") == active
        assert body["vault"]["node"] in nodes

    standby = next(n for n in ha.cluster.nodes if ha.cluster.leader() is not n)
    ha.children[standby.name].process.send_signal(signal.SIGKILL)
    ha.children[standby.name].process.wait(10)
    try:
        reply = request(ha, ha.replicas[0].url, "/v1/sys/health")
        assert reply.status == 200, reply.body[:500]
        states = _states(reply.json())
        assert states[standby.addr] == "unreachable", states
        assert sorted(states.values()) == ["active", "standby", "unreachable"]
    finally:
        ha.restart_vault_node(standby.name)
        wait_cluster_whole(ha)


def test_env_file_lists_every_replica_and_the_cli_reports_the_cluster(ha: DevStack) -> None:
    """The env file's KEYBROKER_ADDR lists both replicas; `keybroker health` run from it (which talks
    to the first) prints the replica and one line per Vault node with the leader marked."""
    text = ha.layout.env_file.read_text()
    line = next(x for x in text.splitlines() if x.startswith("export KEYBROKER_ADDR="))
    assert shlex.split(line.partition("=")[2]) == [",".join(r.url for r in ha.replicas)]
    script = f". {shlex.quote(str(ha.layout.env_file))} && {shlex.quote(sys.executable)} -m broker health"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYBROKER_")}
    done = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "(replica broker-1): ok" in out, out
    assert sum(" vault node " in x for x in out.splitlines()) == 3, out
    assert sum("(leader)" in x for x in out.splitlines()) == 1, out
