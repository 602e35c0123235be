"""``kms.deadline_seconds`` on the real stack: with the KMS stand-in frozen (SIGSTOP) a KMS key's
requests are refused 503 ``backend_unavailable`` with Retry-After within the deadline (never held
through botocore's timeouts and retries, never 504), and after SIGCONT the same broker serves again.

A replica runs with a 2 s deadline (1 s per attempt, 3 attempts: botocore alone would hold a call
about 3-4 s), so the bound is tight enough to tell the deadline from the SDK's own give-up.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from broker.devstack.processes import Child
from broker.devstack.stack import DevStack
from tests.integration.conftest import extra_broker
from tests.integration.ha.faults import Load, assert_problem_503, encrypt_call, frozen, kms_deadline_env
from tests.integration.keyops import create_key

pytestmark = pytest.mark.integration

DEADLINE = 2.0
# Above the deadline: the request's Vault reads, the audit write and a loaded 2-core machine.
SLACK = 2.5
FREEZE_SECONDS = 8.0


@pytest.fixture(scope="module")
def short_deadline(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Child]]:
    directory = tmp_path_factory.mktemp("kms-deadline")
    with extra_broker(stack, directory, "kms-deadline", env=kms_deadline_env(DEADLINE)) as broker:
        yield broker.url, broker.child


def test_frozen_kms_is_refused_503_within_the_deadline_and_recovers(
    stack: DevStack, short_deadline: tuple[str, Child]
) -> None:
    """Every KMS-key request sent while KMS is frozen answers within deadline + slack, each refusal
    a 503 backend_unavailable problem+json with Retry-After; after SIGCONT the same broker process
    encrypts again (200) with nothing restarted."""
    url, child = short_deadline
    name = create_key(stack, "kms")
    call = encrypt_call(stack, name)
    assert call(url, 0).status == 200
    broker_pid, kms_pid = child.pid, stack.children["kms"].pid
    load = Load(stack, [url], call, threads=4)
    with load.running():
        time.sleep(0.5)
        with frozen(kms_pid, FREEZE_SECONDS):
            frozen_at = time.monotonic()
        thawed_at = time.monotonic()
        deadline = thawed_at + 30
        while time.monotonic() < deadline and not any(
            a.status == 200 and a.started > thawed_at for a in load.answers
        ):
            time.sleep(0.2)
    answers = list(load.answers)
    during = [a for a in answers if frozen_at <= a.started < thawed_at - DEADLINE - 1]
    refused = [a for a in answers if a.status != 200]
    slowest = max(a.seconds for a in answers)
    print(
        f"\nKMS frozen {FREEZE_SECONDS:g}s with kms.deadline_seconds={DEADLINE:g}: {len(answers)} requests, "
        f"{len(refused)} refused, slowest {slowest:.2f}s"
    )
    assert all(a.reply is not None for a in answers), [a.error for a in answers if a.reply is None][:3]
    assert slowest < DEADLINE + SLACK
    # Requests sent well inside the freeze could not be served: each one refused, none held.
    assert during
    for answer in during:
        assert_problem_503(answer)
    for answer in refused:
        assert_problem_503(answer)
    assert any(a.status == 200 and a.started > thawed_at for a in answers)
    assert child.pid == broker_pid
    assert child.alive()
    assert stack.children["kms"].pid == kms_pid


def _kms_key_ids(stack: DevStack) -> set[str]:
    kms = stack.kms_client()
    return {k["KeyId"] for page in kms.get_paginator("list_keys").paginate() for k in page["Keys"]}


def test_a_rotation_past_the_deadline_is_outcome_unknown_sent_once_and_not_retried(
    stack: DevStack, short_deadline: tuple[str, Child]
) -> None:
    """A rotation makes a new KMS key (CreateKey has no client token). With KMS frozen the call
    sits in KMS's socket past the deadline and is carried out when KMS thaws: the broker says
    504 outcome_unknown (not a 503 to retry), the SDK raises OutcomeUnknown without sending it
    again, botocore did not resend it either, so at most one KMS key appears and no version is
    recorded; the key reads as before and a later rotation works."""
    from broker.sdk.errors import OutcomeUnknown
    from tests.integration.test_sdk import connect

    url, _child = short_deadline
    name = create_key(stack, "kms")
    before = _kms_key_ids(stack)
    raised: list[Exception] = []
    with connect(stack, url, timeout=30.0) as kb:
        versions = len(kb.get_key(name)["versions"])
        with frozen(stack.children["kms"].pid, DEADLINE + SLACK + 1):
            try:
                kb.rotate_key(name)
            except Exception as exc:  # which one it is, is the assertion
                raised.append(exc)
        time.sleep(2)  # KMS works off what reached it while frozen
        appeared = _kms_key_ids(stack) - before
        after = kb.get_key(name)
        rotated = kb.rotate_key(name)
        events = kb.audit_events(key=name, source="broker", limit=50)["events"]

    assert [type(e) for e in raised] == [OutcomeUnknown], raised
    unknown = raised[0]
    assert isinstance(unknown, OutcomeUnknown)
    assert (unknown.status, unknown.code) == (504, "outcome_unknown")
    assert [e["status"] for e in events if e.get("operation") == "key.rotate"] == [504, 200]
    assert len(appeared) <= 1, appeared
    assert len(after["versions"]) == versions
    assert rotated["latest_version"] == versions + 1


def test_an_unknown_outcome_is_the_idempotency_keys_answer(
    stack: DevStack, short_deadline: tuple[str, Child]
) -> None:
    """A rotation under an Idempotency-Key whose KMS call passed its deadline answers 504
    outcome_unknown; sent again with the same key after KMS thawed, it is not run a second time:
    the 504 is replayed (Idempotent-Replayed) and no version is added; a new key rotates."""
    from tests.integration.conftest import https

    url, _child = short_deadline
    name = create_key(stack, "kms")
    versions = len(https(stack, f"/v1/keys/{name}", url=url).json()["versions"])
    headers = {"Idempotency-Key": f"rotate-{name}"}
    with frozen(stack.children["kms"].pid, DEADLINE + SLACK + 1):
        first = https(stack, f"/v1/keys/{name}/rotate", url=url, body={}, headers=headers)
    time.sleep(2)  # KMS works off what reached it while frozen
    again = https(stack, f"/v1/keys/{name}/rotate", url=url, body={}, headers=headers)
    after = len(https(stack, f"/v1/keys/{name}", url=url).json()["versions"])
    fresh = https(
        stack, f"/v1/keys/{name}/rotate", url=url, body={}, headers={"Idempotency-Key": f"new-{name}"}
    )

    assert (first.status, first.json()["code"]) == (504, "outcome_unknown"), first.body
    assert (again.status, again.json()["code"]) == (504, "outcome_unknown"), again.body
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert after == versions
    assert fresh.status == 200, fresh.body
    assert fresh.json()["latest_version"] == versions + 1
