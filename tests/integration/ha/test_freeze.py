"""SIGSTOP (a frozen process, not a dead one) of the Vault leader and of the KMS stand-in."""

from __future__ import annotations

import time

import pytest

from broker.devstack.stack import DevStack
from tests.integration.ha.faults import (
    Answer,
    Load,
    assert_problem_503,
    create_key,
    encrypt_call,
    error_window,
    frozen,
    wait_cluster_whole,
)

pytestmark = pytest.mark.integration

FREEZE_SECONDS = 10.0
# vault.deadline_seconds (8 s) bounds one Vault call; a request makes at most two in a row
# (key metadata, then the operation). kms.deadline_seconds (8 s) bounds the one KMS call, the
# SDK's retries included; the slack is a loaded 2-core machine.
VAULT_ANSWER_BOUND = 20.0
KMS_ANSWER_BOUND = 8.0 + 4.0


def _assert_refusal(answer: Answer, statuses: tuple[int, ...]) -> None:
    assert answer.reply is not None, answer.error
    assert answer.status in statuses, (answer.status, answer.reply.body[:300])
    assert answer.reply.headers.get("Content-Type", "").startswith("application/problem+json")
    assert "code" in answer.reply.json()


def _recovered(answers: list[Answer], after: float, urls: list[str]) -> bool:
    """Both replicas answered 200 to requests sent after ``after``."""
    return {a.url for a in answers if a.status == 200 and a.started > after} == set(urls)


def test_frozen_vault_leader_answers_within_the_deadline_and_recovers(ha: DevStack) -> None:
    """With the active Vault node stopped for 10 s every request is answered within the broker's
    deadline (200 from another node once a new leader is elected, else 503 problem+json), none
    hangs; after SIGCONT the cluster serves again with no process restarted."""
    assert ha.cluster is not None
    create_key(ha, "ha-freeze")
    urls = [r.url for r in ha.replicas]
    pids = {name: child.pid for name, child in ha.children.items()}
    load = Load(ha, urls, encrypt_call(ha, "ha-freeze"), threads=8)
    with load.running():
        time.sleep(2)
        leader = ha.cluster.leader()
        assert leader is not None
        with frozen(ha.children[leader.name].pid, FREEZE_SECONDS):
            frozen_at = time.monotonic()
        thawed_at = time.monotonic()
        deadline = thawed_at + 30
        while not _recovered(load.answers, thawed_at, urls) and time.monotonic() < deadline:
            time.sleep(0.5)
    answers = list(load.answers)
    slowest = max(a.seconds for a in answers)
    print(
        f"\nvault leader {leader.name} frozen {FREEZE_SECONDS:g}s: {len(answers)} requests, "
        f"{sum(a.status != 200 for a in answers)} refused, error window {error_window(answers):.2f}s, "
        f"slowest answer {slowest:.2f}s"
    )
    assert all(a.reply is not None for a in answers), [a.error for a in answers if a.reply is None][:3]
    assert slowest < VAULT_ANSWER_BOUND
    for answer in answers:
        if answer.status != 200:
            _assert_refusal(answer, (503,))
    # Some requests were in flight or sent during the freeze (the test exercised it).
    assert any(frozen_at - 1 < a.started < thawed_at for a in answers)
    assert _recovered(answers, thawed_at, urls)
    # Recovery without a restart: the same processes serve.
    assert {name: child.pid for name, child in ha.children.items()} == pids
    wait_cluster_whole(ha)


def test_frozen_kms_answers_within_the_deadline_and_recovers(ha: DevStack) -> None:
    """With the KMS stand-in stopped for 10 s (longer than kms.deadline_seconds) a KMS key's
    requests are answered within that deadline: 503 backend_unavailable problem+json with
    Retry-After, none held longer; Vault keys keep serving meanwhile, and after SIGCONT the KMS key
    serves again, nothing restarted."""
    create_key(ha, "ha-freeze-kms", backend="kms")
    create_key(ha, "ha-freeze-vault")
    urls = [r.url for r in ha.replicas]
    pids = {name: child.pid for name, child in ha.children.items()}
    kms_load = Load(ha, urls, encrypt_call(ha, "ha-freeze-kms"), threads=4)
    vault_load = Load(ha, urls, encrypt_call(ha, "ha-freeze-vault"), threads=4)
    with kms_load.running(), vault_load.running():
        time.sleep(2)
        with frozen(ha.children["kms"].pid, FREEZE_SECONDS):
            frozen_at = time.monotonic()
        thawed_at = time.monotonic()
        deadline = thawed_at + 40
        while not _recovered(kms_load.answers, thawed_at, urls) and time.monotonic() < deadline:
            time.sleep(0.5)
    kms_answers, vault_answers = list(kms_load.answers), list(vault_load.answers)
    refused = [a for a in kms_answers if a.status != 200]
    slowest = max(a.seconds for a in kms_answers)
    print(
        f"\nKMS frozen {FREEZE_SECONDS:g}s: {len(kms_answers)} KMS-key requests, {len(refused)} refused, "
        f"slowest {slowest:.2f}s; meanwhile {len(vault_answers)} Vault-key requests, "
        f"{sum(a.status != 200 for a in vault_answers)} refused"
    )
    assert all(a.reply is not None for a in kms_answers + vault_answers)
    assert slowest < KMS_ANSWER_BOUND
    # The freeze (longer than the deadline) was felt: requests were refused, each a 503.
    assert refused
    for answer in refused:
        assert_problem_503(answer)
    assert all(a.status == 200 for a in vault_answers)
    assert any(frozen_at < a.started < thawed_at for a in vault_answers)
    assert _recovered(kms_answers, thawed_at, urls)
    assert {name: child.pid for name, child in ha.children.items()} == pids
