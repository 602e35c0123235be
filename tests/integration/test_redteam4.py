"""Red team, wave 4, on the real stack: a listing cursor naming hidden keys, a replayed 504, a
rotation period or grant expiry past the calendar, and a client hanging up mid-body.

Each test is one finding; its docstring gives the attack and the behaviour it checks.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from broker.devstack.stack import DevStack
from broker.timeutil import iso
from tests.integration.conftest import Reply, extra_broker, https
from tests.integration.ha.faults import frozen, kms_deadline_env
from tests.integration.keyops import create_key, unique
from tests.integration.policyops import bind, identity, put_role


def _until_bound(stack: DevStack, stem: str, path: str) -> Reply:
    """Poll until a new binding reaches the policy cache (bounded)."""
    deadline = time.monotonic() + 15
    reply = https(stack, path, who=stem)
    while reply.status == 403 and time.monotonic() < deadline:
        time.sleep(0.3)
        reply = https(stack, path, who=stem)
    return reply


def test_a_listing_cursor_never_names_a_key_the_caller_may_not_read(stack: DevStack) -> None:
    """A caller who may list keys but read only one of them pages with limit=1 from its own key:
    a page cut by the scan budget must not hand out, as ``next``, the name of a key it may not
    read (following such cursors walks every key name in the registry)."""
    stem = unique("rt4p")
    names = [f"{stem}-{i}" for i in range(9)]
    for name in names:
        reply = https(stack, "/v1/keys", body={"name": name, "backend": "vault", "environment": "dev"})
        assert reply.status == 201, reply.body
    mine, hidden = names[0], set(names[1:])
    role = unique("rt4-lister")
    put_role(
        stack,
        role,
        [{"operations": ["key.list"]}, {"operations": ["key.read"], "keys": {"name": [mine]}}],
    )
    who, principal = identity(stack, unique("rt4-lister"))
    bind(stack, principal, role)

    reply = _until_bound(stack, who, "/v1/keys?" + urlencode({"after": mine, "limit": "1"}))
    assert reply.status == 200, reply.body
    page = reply.json()
    assert not hidden & {k["name"] for k in page["keys"]}
    assert page["next"] not in hidden, f"the cursor names a key the caller may not read: {page['next']}"
    assert not [n for n in hidden if n in json.dumps(page)]

    # The cursor is the caller's own: the administrator, the same caller with another filter, or
    # an edited cursor get 400, and the caller following it reaches the end without a hidden name.
    cursor = page["next"]
    flipped = cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]
    refusals = [
        https(stack, "/v1/keys?" + urlencode({"after": cursor, "limit": "1"})),
        https(stack, "/v1/keys?" + urlencode({"after": cursor, "limit": "1", "state": "active"}), who=who),
        https(stack, "/v1/keys?" + urlencode({"after": flipped, "limit": "1"}), who=who),
        https(stack, "/v1/keys?" + urlencode({"after": "~c1." + "A" * 300, "limit": "1"}), who=who),
    ]
    for refused in refusals:
        assert (refused.status, refused.json()["code"]) == (400, "bad_request"), refused.body
        assert "'next' of an earlier page of this same listing" in refused.json()["detail"]
    seen: list[str] = []
    for _ in range(50):
        following = https(stack, "/v1/keys?" + urlencode({"after": cursor, "limit": "100"}), who=who)
        assert following.status == 200, following.body
        seen += [k["name"] for k in following.json()["keys"]]
        assert not [n for n in hidden if n in following.body.decode()]
        cursor = following.json()["next"]
        if cursor is None:
            break
    assert cursor is None
    assert seen == []  # the one key it may read lies before the cursor


# -- a replayed 504 outcome_unknown is an error like the first ------------------------------

KMS_DEADLINE = 2.0


@pytest.fixture(scope="module")
def short_kms_deadline(
    stack: DevStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """A replica whose KMS calls give up after 2 s (a frozen KMS makes a rotation 504): its
    address and its audit directory."""
    directory = tmp_path_factory.mktemp("rt4-deadline")
    with extra_broker(stack, directory, "rt4-deadline", env=kms_deadline_env(KMS_DEADLINE)) as broker:
        yield broker.url, broker.audit_dir


def _records(audit_dir: Path, reply: Reply) -> list[dict[str, Any]]:
    """The audit records of the request that got ``reply``."""
    request_id = reply.headers["X-Broker-Request-Id"]
    return [
        row
        for path in sorted(audit_dir.glob("audit-*.jsonl"))
        for line in path.read_bytes().splitlines()
        if (row := json.loads(line)).get("request_id") == request_id
    ]


def test_a_replayed_unknown_outcome_is_problem_json_and_recorded_as_that_error(
    stack: DevStack, short_kms_deadline: tuple[str, Path]
) -> None:
    """A KMS rotation under an Idempotency-Key answers 504 outcome_unknown; its replay is the same
    error as the first answer: application/problem+json (like every error the broker gives) and
    an audit record naming the error's code, not a plain JSON 504 whose record holds no error."""
    url, audit_dir = short_kms_deadline
    name = create_key(stack, "kms")
    headers = {"Idempotency-Key": unique("rt4-504")}
    with frozen(stack.children["kms"].pid, KMS_DEADLINE + 4):
        first = https(stack, f"/v1/keys/{name}/rotate", url=url, body={}, headers=headers)
    again = https(stack, f"/v1/keys/{name}/rotate", url=url, body={}, headers=headers)
    time.sleep(1)  # the records reach the file

    assert (first.status, first.json()["code"]) == (504, "outcome_unknown"), first.body
    assert first.headers["Content-Type"].startswith("application/problem+json")
    assert (again.status, again.json()["code"]) == (504, "outcome_unknown"), again.body
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.headers["Content-Type"].startswith("application/problem+json"), again.headers["Content-Type"]
    [original] = _records(audit_dir, first)
    [replayed] = _records(audit_dir, again)
    assert original["error"]["code"] == "outcome_unknown", original
    assert replayed["idempotency"]["replayed"] is True, replayed
    assert (replayed["error"] or {}).get("code") == "outcome_unknown", replayed


# -- one key's rotation period must not stop the scheduler for every other key ----------------

SCHEDULER_TICK = 0.5


@pytest.fixture(scope="module")
def fast_scheduler(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A replica whose scheduler runs every half second: its log file."""
    every_tick = {"KEYBROKER__KEYS__SCHEDULER_INTERVAL_SECONDS": str(SCHEDULER_TICK)}
    directory = tmp_path_factory.mktemp("rt4-scheduler")
    with extra_broker(stack, directory, "rt4-scheduler", env=every_tick) as broker:
        yield broker.child.log_path


def _versions(stack: DevStack, name: str) -> int:
    return len(https(stack, f"/v1/keys/{name}").json()["versions"])


def test_a_rotation_period_beyond_the_calendar_does_not_stop_scheduled_rotation(
    stack: DevStack, fast_scheduler: Path
) -> None:
    """Anyone who may create one key set its rotation_period to 2^53-1 seconds (accepted then: the
    limit was 2^53; now 100 years, and a larger one is a 400). Such an entry (an older broker's)
    has its due date past the year 9999: the scheduler's pass must treat it as never due, not
    crash on it and so never reach the keys after it (every pass, every replica): a plain key
    whose rotation is due is still rotated."""
    body = {"backend": "vault", "environment": "dev", "rotation_period": 2**53 - 1}
    refused = https(stack, "/v1/keys", body={"name": unique("rt4-forever"), **body})
    assert (refused.status, refused.json()["code"]) == (400, "bad_request"), refused.body
    assert "at most" in refused.json()["detail"]
    poison = unique("0rt4-forever")  # '0' sorts before every other test key
    made = https(stack, "/v1/keys", body={"name": poison, "backend": "vault", "environment": "dev"})
    assert made.status == 201, made.body
    kv = stack.vault_client().secrets.kv.v2
    out = kv.read_secret_version(path=f"keys/{poison}", mount_point="kb-kv", raise_on_deleted_version=True)
    record, version = out["data"]["data"], out["data"]["metadata"]["version"]
    record["rotation_period_seconds"] = 2**53 - 1
    kv.create_or_update_secret(path=f"keys/{poison}", secret=record, cas=version, mount_point="kb-kv")
    plain = create_key(stack, "vault", rotation_period="1h")
    past = datetime.now(UTC) - timedelta(hours=1, minutes=1)
    out = kv.read_secret_version(path=f"keys/{plain}", mount_point="kb-kv", raise_on_deleted_version=True)
    record, version = out["data"]["data"], out["data"]["metadata"]["version"]
    record["last_rotated_at"] = iso(past)
    kv.create_or_update_secret(path=f"keys/{plain}", secret=record, cas=version, mount_point="kb-kv")

    deadline = time.monotonic() + 30
    while _versions(stack, plain) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    crashed = [line for line in fast_scheduler.read_text(errors="replace").splitlines() if "crashed" in line]
    assert _versions(stack, plain) == 2, crashed[-1:]
    assert not crashed, crashed[-1]


def _grant_limit(stack: DevStack, value: object) -> None:
    """Set the policy's grant_max_expires_in (the document as stored, check-and-set)."""
    for _ in range(20):
        current = https(stack, "/v1/policies").json()
        document = {**current["document"], "settings": {"grant_max_expires_in": value}}
        reply = https(
            stack, "/v1/policies", method="PUT", body={"document": document, "version": current["version"]}
        )
        if reply.status == 200:
            return
        assert reply.status == 409, reply.body
    raise AssertionError("could not set grant_max_expires_in: the policy document kept changing")


def test_a_grant_whose_expiry_is_past_the_calendar_is_a_400_not_a_500(stack: DevStack) -> None:
    """The policy's grant_max_expires_in has no upper bound; with it set very high, a grant asking
    for 10^14 seconds (expiring past year 9999) is refused 400 naming the limit, not a 500
    internal error from the datetime overflow."""
    name = create_key(stack, "vault")
    before = https(stack, "/v1/policies").json()["document"].get("settings", {}).get("grant_max_expires_in")
    _grant_limit(stack, 10**15)
    try:
        reply = https(
            stack,
            f"/v1/keys/{name}/grants",
            body={
                "grantee": "spiffe://keybroker.dev/user/rt4-nobody",
                "operations": ["crypto.decrypt"],
                "expires_in": 10**14,
            },
        )
        fine = https(
            stack,
            f"/v1/keys/{name}/grants",
            body={
                "grantee": "spiffe://keybroker.dev/user/rt4-nobody",
                "operations": ["crypto.decrypt"],
                "expires_in": "1h",
            },
        )
    finally:
        _grant_limit(stack, before if before is not None else 86400)
    assert (reply.status, reply.json()["code"]) == (400, "bad_request"), reply.body
    assert fine.status == 201, fine.body


# -- a client that hangs up mid-body is not an internal error -------------------------------


def test_a_client_that_hangs_up_mid_body_is_recorded_as_such_not_as_an_internal_error(
    stack: DevStack,
) -> None:
    """A caller sends a rotate's header and half its body, then closes the connection. The broker's
    record says the client went away (a 4xx, code client_disconnected), not a 500 internal_error,
    and its log holds no traceback for it: anyone could otherwise fill the error log with
    tracebacks and the audit log with false internal errors."""
    name = create_key(stack, "vault")
    marker = unique("rt4-hangup")
    host, port = "127.0.0.1", int(stack.broker_url.rsplit(":", 1)[1])
    with (
        socket.create_connection((host, port), timeout=10) as sock,
        stack.client_ssl("admin").wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            f"POST /v1/keys/{name}/rotate HTTP/1.1\r\nHost: localhost\r\nX-Request-Id: {marker}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
        )
        time.sleep(0.5)
    deadline = time.monotonic() + 10
    found: list[dict[str, Any]] = []
    while not found and time.monotonic() < deadline:
        time.sleep(0.3)
        found = [
            row
            for path in sorted(stack.layout.audit_dir.glob("audit-*.jsonl"))
            for line in path.read_bytes().splitlines()
            if marker.encode() in line and (row := json.loads(line)).get("client_request_id") == marker
        ]
    tracebacks = [
        line
        for log in stack.layout.logs.glob("broker*.log")
        for line in log.read_text(errors="replace").splitlines()
        if marker in line and "Traceback" in line
    ]
    assert len(found) == 1, found
    assert found[0]["status"] < 500, found[0]
    assert found[0]["error"]["code"] == "client_disconnected", found[0]
    assert not tracebacks, tracebacks[0][:2000]
