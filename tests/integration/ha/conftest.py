"""The HA stack for fault tests: three OpenBao raft nodes, two broker replicas, one KMS and HSM.

Started once per session (about 25 s) by the same code as ``keybroker dev --ha``. Tests that
kill or freeze a process bring it back before they end, so the next test finds three voters.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.devstack.stack import DevStack, free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    state = tmp_path_factory.mktemp("ha-stack")
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    dev = DevStack(state, broker_port=first, ha=True, replicas=2, replica_ports=[first, second])
    dev.start()
    try:
        yield dev
    finally:
        dev.stop()
