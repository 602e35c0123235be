"""kill -9 of one broker replica under load, with clients that know both addresses."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from broker.devstack.stack import DevStack
from tests.integration.conftest import Reply
from tests.integration.ha.faults import (
    Load,
    audit_request_ids,
    broker_request_id,
    create_key,
    decrypt_all,
    encrypt_call,
    request,
)

pytestmark = pytest.mark.integration


def _with_failover(urls: list[str], call: Callable[[str, int], Reply]) -> Callable[[str, int], Reply]:
    """A client that knows every replica: on no answer or a 503 it tries the next one (bounded)."""

    def failover(url: str, n: int) -> Reply:
        start = urls.index(url)
        last: Reply | None = None
        for attempt in range(4):
            target = urls[(start + attempt) % len(urls)]
            try:
                last = call(target, n)
            except OSError:
                time.sleep(0.1)
                continue
            if last.status != 503:
                return last
            time.sleep(0.1)
        if last is None:
            raise ConnectionError("no replica answered")
        return last

    return failover


def test_replica_kill_under_load_fails_no_operation(ha: DevStack) -> None:
    """Clients retrying on the other address see no failed encrypt while one replica is killed; every
    answer has its audit record on disk; the killed replica restarts on its log and its chain verifies."""
    create_key(ha, "ha-replica-kill")
    urls = [r.url for r in ha.replicas]
    victim = ha.replicas[1]
    load = Load(ha, urls, _with_failover(urls, encrypt_call(ha, "ha-replica-kill")), threads=16)
    with load.running():
        time.sleep(3)
        killed_at = time.monotonic()
        ha.children[victim.name].process.send_signal(signal.SIGKILL)
        ha.children[victim.name].process.wait(10)
        time.sleep(5)
    answers = list(load.answers)
    failed = [a for a in answers if a.status != 200]
    survivor_after = sum(1 for a in answers if a.started > killed_at)
    print(
        f"\nreplica {victim.name} killed: {len(answers)} operations, {len(failed)} failed, "
        f"{survivor_after} after the kill"
    )
    assert failed == [], [(a.status, a.error) for a in failed[:3]]
    assert survivor_after > 10
    recorded = audit_request_ids(ha.replicas)
    assert [broker_request_id(a) for a in answers if broker_request_id(a) not in recorded] == []
    assert decrypt_all(ha, urls[0], "ha-replica-kill", answers) == []

    ha.restart_replica(victim)
    verified = request(ha, victim.url, "/v1/audit/verify").json()
    print(f"replica {victim.name} audit verify after restart: {verified}")
    assert verified["ok"] is True, verified
