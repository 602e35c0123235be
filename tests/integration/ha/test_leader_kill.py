"""kill -9 of the Vault raft leader under 32-way encrypt load through both broker replicas."""

from __future__ import annotations

import time

import pytest

from broker.devstack.stack import DevStack
from tests.integration.ha.faults import (
    Load,
    assert_problem_503,
    audit_request_ids,
    broker_request_id,
    create_key,
    decrypt_all,
    encrypt_call,
    error_window,
    kill_leader,
    lead_where_a_replica_is,
    request,
    throughput,
    wait_cluster_whole,
)

pytestmark = pytest.mark.integration

# The broker's own bound on one Vault call (vault.deadline_seconds) twice over (a request may
# read key metadata and then encrypt), plus room for a loaded two-core machine.
ANSWER_BOUND = 25.0


def test_leader_kill_under_load_loses_nothing(ha: DevStack) -> None:
    """Every request is answered in bounded time; the failures are 503 problem+json with Retry-After
    and last a short window; the key keeps its one version; every ciphertext decrypts; each answer
    has its audit record on one of the replicas."""
    create_key(ha, "ha-leader-kill")
    # The leader is the very node (at least) one replica talks to: that replica must fail over.
    on_leader = lead_where_a_replica_is(ha)
    load = Load(ha, [r.url for r in ha.replicas], encrypt_call(ha, "ha-leader-kill"), threads=32)
    with load.running():
        time.sleep(4)
        killed_at = time.monotonic()
        killed = kill_leader(ha)
        time.sleep(12)
    answers = list(load.answers)
    try:
        window = error_window(answers)
        failed = [a for a in answers if a.status != 200]
        before = throughput(answers, killed_at - 3, killed_at)
        after = throughput(answers, killed_at + 6, killed_at + 12)
        print(
            f"\nleader {killed} (the node of {sorted(on_leader)}) killed: {len(answers)} requests, "
            f"{len(failed)} failed, "
            f"error window {window:.2f}s, {before:.0f} req/s before, {after:.0f} req/s after, "
            f"slowest answer {max(a.seconds for a in answers):.2f}s"
        )
        assert len(answers) > 100
        assert all(a.reply is not None for a in answers), [a.error for a in answers if a.reply is None][:3]
        assert max(a.seconds for a in answers) < ANSWER_BOUND
        for answer in failed:
            assert_problem_503(answer)
        assert window <= 20.0
        # Serving again on both replicas after the election, with the killed node still down.
        assert {a.url for a in answers if a.status == 200 and a.started > killed_at + 6} == set(load.urls)
        # The replicas that used the killed node moved to another one.
        dead = ha.vault_node(killed).addr
        for replica in ha.replicas:
            if replica.name in on_leader:
                assert request(ha, replica.url, "/v1/sys/health").json()["vault"]["node"] != dead

        key = request(ha, ha.replicas[1].url, "/v1/keys/ha-leader-kill").json()
        assert [v["version"] for v in key["versions"]] == [1], key["versions"]
        assert decrypt_all(ha, ha.replicas[0].url, "ha-leader-kill", answers) == []
        recorded = audit_request_ids(ha.replicas)
        missing = [broker_request_id(a) for a in answers if broker_request_id(a) not in recorded]
        assert missing == [], f"{len(missing)} answers without an audit record"
    finally:
        ha.restart_vault_node(killed)
        wait_cluster_whole(ha)
