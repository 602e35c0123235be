"""The three-node OpenBao raft cluster of ``keybroker dev --ha``.

Every node is started at once (a resumed cluster needs a quorum before any node can
serve), node 1 is initialised by the ordinary bootstrap, and the others join it through
``retry_join`` and unseal themselves with the shared awskms seal key. Start-up waits until
every node is unsealed and the raft configuration lists all of them as voters, so the
cluster survives the loss of any one node from its first request.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from broker.devstack.common import Layout, StackError
from broker.devstack.kms import DevKms
from broker.devstack.processes import Child, ChildFailed, wait_until
from broker.devstack.vault import DevVault

HA_NODES = 3
# Autopilot promotes a joined node to voter once it has been healthy this long (raft's
# default is 10 s; a loopback dev cluster is stable at once).
_STABILIZATION = "2s"


class DevCluster:
    """``nodes`` OpenBao nodes sharing one raft log; node 1 is the one bootstrapped."""

    def __init__(
        self,
        layout: Layout,
        kms: DevKms,
        *,
        tls: bool,
        progress: Callable[[str], None],
        nodes: int = HA_NODES,
    ) -> None:
        self.layout = layout
        self.nodes = [DevVault(layout, kms, tls=tls, progress=progress, node=n) for n in range(1, nodes + 1)]
        for node in self.nodes:
            node.peers = [other for other in self.nodes if other is not node]

    @property
    def first(self) -> DevVault:
        return self.nodes[0]

    def spawn_all(self) -> dict[str, Child]:
        """Start every node; wait until each answers (sealed or not)."""
        for node in self.nodes:
            node.allocate_ports()
        children: dict[str, Child] = {}
        try:
            for node in self.nodes:
                children[node.name] = node.spawn()
            for node in self.nodes:
                wait_until(children[node.name], _answering(node), timeout=30, what="answering")
            if self.layout.vault_init.is_file():
                for node in self.nodes:
                    node.wait_unsealed(children[node.name], timeout=60)
        except BaseException:
            for child in children.values():
                child.stop()
            raise
        return children

    def restart_node(self, node: DevVault) -> Child:
        """Start one node again (after a kill); it rejoins from its own raft directory."""
        child = node.spawn()
        wait_until(child, lambda: bool(node.seal_status()), timeout=30, what="answering")
        node.wait_unsealed(child, timeout=60)
        return child

    def tune_autopilot(self) -> None:
        """Promote joined nodes to voters quickly; never remove a node that is merely down."""
        self._root_call(
            "POST",
            "sys/storage/raft/autopilot/configuration",
            {"server_stabilization_time": _STABILIZATION, "cleanup_dead_servers": False},
        )

    def wait_formed(self, children: dict[str, Child], timeout: float = 90) -> None:
        """Until every node is unsealed and a voter in the raft configuration."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            node.wait_unsealed(children[node.name], timeout=max(deadline - time.monotonic(), 1))
        wanted = {node.node_id for node in self.nodes}
        while True:
            for child in children.values():
                if not child.alive():
                    raise ChildFailed(f"{child.name} exited while the cluster formed:\n{child.log_tail()}")
            voters = self.voters()
            if wanted <= voters:
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"the raft cluster did not form within {timeout:g}s: voters {sorted(voters)}, "
                    f"wanted {sorted(wanted)}"
                )
            time.sleep(0.5)

    def raft_servers(self) -> list[dict[str, Any]]:
        """The raft configuration's servers (node_id, address, leader, voter), asked of any node."""
        try:
            out = self._root_call("GET", "sys/storage/raft/configuration")
        except StackError:
            return []
        servers: list[dict[str, Any]] = ((out.get("data") or {}).get("config") or {}).get("servers") or []
        return servers

    def voters(self) -> set[str]:
        return {str(s.get("node_id")) for s in self.raft_servers() if s.get("voter")}

    def leader(self) -> DevVault | None:
        """The node that is active now (``sys/leader`` answered ``is_self``), if any."""
        for node in self.nodes:
            status = _get_json(f"{node.addr}/v1/sys/leader")
            if status.get("is_self"):
                return node
        return None

    def wait_leader(self, children: dict[str, Child], timeout: float = 60) -> DevVault:
        """The active node, once there is one (a resumed cluster elects a leader first)."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader is not None:
                return leader
            for child in children.values():
                if not child.alive():
                    raise ChildFailed(f"{child.name} exited before a leader was elected:\n{child.log_tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"no Vault node became active within {timeout:g}s")
            time.sleep(0.2)

    def _root_call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call with the dev root token, tried on each node until one answers."""
        token = json.loads(self.layout.vault_init.read_text())["root_token"]
        last = "no node answered"
        for node in self.nodes:
            request = urllib.request.Request(  # noqa: S310 - http URL we built
                f"{node.addr}/v1/{path}",
                data=None if body is None else json.dumps(body).encode(),
                headers={"X-Vault-Token": token},
                method=method,
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as resp:  # noqa: S310 - http URL we built
                    raw = resp.read()
                    answer: dict[str, Any] = json.loads(raw) if raw else {}
                    return answer
            except urllib.error.HTTPError as exc:
                last = f"{node.name}: HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                last = f"{node.name}: {exc.__class__.__name__}"
        raise StackError(f"vault {method} {path}: {last}")


def _answering(node: DevVault) -> Callable[[], bool]:
    return lambda: bool(node.seal_status())


def _get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - http URL we built
            answer: dict[str, Any] = json.load(resp)
            return answer
    except urllib.error.HTTPError as exc:
        try:
            answer = json.load(exc)
        except ValueError:
            return {}
        return answer
    except (OSError, ValueError):
        return {}
