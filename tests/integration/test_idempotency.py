"""``Idempotency-Key`` on key management, on the real stack with two broker replicas: a retry
through either replica gets the first answer instead of a second key or version; another body
under the same key is 422; a key still running is 409; a failed request keeps nothing; the
header is hostile input; a replay is audited as one."""

from __future__ import annotations

import http.client
import json
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import hvac.exceptions
import pytest

from broker.devstack.stack import DevStack
from broker.timeutil import iso
from tests.integration.conftest import Reply, https
from tests.integration.keyops import create_key, lifecycle, registry_record, unique

HEADER = "Idempotency-Key"


def idem() -> str:
    return f"retry-{uuid.uuid4()}"


def send(stack: DevStack, path: str, key: str, body: Any = None, *, url: str | None = None) -> Reply:
    return https(stack, path, url=url, body={} if body is None else body, headers={HEADER: key})


def versions(stack: DevStack, name: str) -> list[int]:
    return [v["version"] for v in registry_record(stack, name)["versions"]]


def audit_records(stack: DevStack, url: str) -> list[dict[str, Any]]:
    """Every record of the broker at ``url`` (each replica keeps its own log)."""
    port = int(url.rsplit(":", 1)[1])
    directory = stack.layout.audit_dir
    if port != stack.broker_port:
        directory = directory.with_name(f"audit-{port}")
    out: list[dict[str, Any]] = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        out.extend(json.loads(line) for line in path.read_bytes().splitlines())
    return out


def record_of(stack: DevStack, url: str, reply: Reply) -> dict[str, Any]:
    request_id = reply.headers["X-Broker-Request-Id"]
    found = [r for r in audit_records(stack, url) if r.get("request_id") == request_id]
    assert len(found) == 1, f"{len(found)} records for {request_id}"
    return found[0]


def test_create_retried_through_the_other_replica_gets_the_first_answer(
    stack: DevStack, second_broker: str
) -> None:
    """A create retried (same key, same body) on the other replica: 201 with the first answer,
    marked replayed, audited as a replay of the first request; one key, one version."""
    name, key = unique("idem-create"), idem()
    body = {"name": name, "backend": "vault", "environment": "dev"}
    first = send(stack, "/v1/keys", key, body)
    again = send(stack, "/v1/keys", key, body, url=second_broker)

    assert first.status == 201, first.body
    assert again.status == 201, again.body
    assert again.json() == first.json()
    assert again.headers["Location"] == f"/v1/keys/{name}"
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert first.headers.get("Idempotent-Replayed") is None
    assert versions(stack, name) == [1]
    original = record_of(stack, stack.broker_url, first)
    replayed = record_of(stack, second_broker, again)
    assert original["idempotency"]["replayed"] is False
    assert replayed["idempotency"]["replayed"] is True
    assert replayed["idempotency"]["original_request_id"] == original["request_id"]
    assert replayed["idempotency"]["record"] == original["idempotency"]["record"]
    # Without the header a second create is what it always was: the name is taken.
    assert https(stack, "/v1/keys", body=body).status == 409


@pytest.mark.parametrize("backend", ["vault", "kms", "hsm"])
def test_rotate_retried_on_both_replicas_makes_one_version(
    stack: DevStack, second_broker: str, backend: str
) -> None:
    """Three sends of one rotate (one key) through both replicas: one new version, the same answer."""
    name, key = create_key(stack, backend), idem()
    replies = [
        send(stack, f"/v1/keys/{name}/rotate", key, url=url)
        for url in (stack.broker_url, second_broker, stack.broker_url)
    ]
    assert [r.status for r in replies] == [200, 200, 200]
    assert all(r.json() == replies[0].json() for r in replies)
    assert replies[0].json()["latest_version"] == 2
    assert versions(stack, name) == [1, 2]
    # A new key is a new request.
    assert send(stack, f"/v1/keys/{name}/rotate", idem(), url=second_broker).json()["latest_version"] == 3


def test_concurrent_sends_of_one_rotate_do_it_once(stack: DevStack, second_broker: str) -> None:
    """Twelve sends at once through both replicas: one rotation; every other send is its replay
    or 409 idempotency_in_progress (problem+json), never a second version."""
    name, key = create_key(stack, "vault"), idem()
    urls = [stack.broker_url, second_broker]
    with ThreadPoolExecutor(max_workers=12) as pool:
        replies = list(
            pool.map(lambda i: send(stack, f"/v1/keys/{name}/rotate", key, url=urls[i % 2]), range(12))
        )

    assert versions(stack, name) == [1, 2]
    done = [r for r in replies if r.status == 200]
    busy = [r for r in replies if r.status == 409]
    assert len(done) + len(busy) == 12, [r.status for r in replies]
    assert done
    assert all(r.json()["latest_version"] == 2 for r in done)
    assert sum(r.headers.get("Idempotent-Replayed") != "true" for r in done) == 1
    for r in busy:
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert r.json()["code"] == "idempotency_in_progress"
        assert r.headers["Retry-After"] == "1"


def test_same_key_with_another_body_is_refused(stack: DevStack) -> None:
    """One key, two bodies: 422 idempotency_key_reused and the second change is not made."""
    name, key = create_key(stack, "vault", deletion_protection=False), idem()
    first = send(stack, f"/v1/keys/{name}/schedule-destruction", key, {"pending_days": 7})
    other = send(stack, f"/v1/keys/{name}/schedule-destruction", key, {"pending_days": 30})
    # Member order and spacing do not make another body.
    same = https(
        stack,
        f"/v1/keys/{name}/schedule-destruction",
        body={"pending_days": 7},
        headers={HEADER: key},
    )
    assert first.status == 200, first.body
    assert other.status == 422
    assert other.headers["Content-Type"].startswith("application/problem+json")
    assert other.json()["code"] == "idempotency_key_reused"
    assert key not in other.body.decode()
    assert same.status == 200
    assert same.headers.get("Idempotent-Replayed") == "true"
    assert registry_record(stack, name)["destroy_after"] == first.json()["destroy_after"]


def test_a_failed_request_keeps_nothing(stack: DevStack) -> None:
    """A rotate refused (key suspended) is not replayed: its retry, once the key is active, rotates."""
    name, key = create_key(stack, "vault"), idem()
    assert lifecycle(stack, name, "suspend").status == 200
    refused = send(stack, f"/v1/keys/{name}/rotate", key)
    assert lifecycle(stack, name, "resume").status == 200
    retried = send(stack, f"/v1/keys/{name}/rotate", key)
    assert refused.status == 409
    assert refused.json()["code"] == "conflict"
    assert retried.status == 200
    assert retried.headers.get("Idempotent-Replayed") is None
    assert versions(stack, name) == [1, 2]


def test_an_expired_record_is_not_replayed(stack: DevStack) -> None:
    """Past keys.idempotency_ttl_seconds (its expiry moved back in Vault) the same key rotates again."""
    name, key = create_key(stack, "vault"), idem()
    assert send(stack, f"/v1/keys/{name}/rotate", key).status == 200
    kv = stack.vault_client().secrets.kv.v2
    names = kv.list_secrets(path="idempotency", mount_point="kb-kv")["data"]["keys"]
    assert all(re.fullmatch(r"[0-9a-f]{64}", n) for n in names), names
    mine = []
    for n in names:
        data = kv.read_secret_version(
            path=f"idempotency/{n}", mount_point="kb-kv", raise_on_deleted_version=True
        )
        if data["data"]["data"].get("answer", {}).get("body", {}).get("name") == name:
            mine.append((n, data["data"]["data"], data["data"]["metadata"]["version"]))
    assert len(mine) == 1
    record_name, record, version = mine[0]
    assert record["state"] == "done"
    assert key not in json.dumps(record)
    record["expires_at"] = iso(datetime.now(UTC) - timedelta(seconds=1))
    try:
        kv.create_or_update_secret(
            path=f"idempotency/{record_name}", secret=record, cas=version, mount_point="kb-kv"
        )
    except hvac.exceptions.InvalidRequest as exc:  # pragma: no cover - nobody else writes it
        raise AssertionError("the record changed under the test") from exc
    again = send(stack, f"/v1/keys/{name}/rotate", key)
    assert again.status == 200
    assert again.headers.get("Idempotent-Replayed") is None
    assert versions(stack, name) == [1, 2, 3]


@pytest.mark.parametrize(
    "value",
    ["x" * 256, "has space", "tab\there", "caf\u00e9", "../../sys/seal", ""],
    ids=["too-long", "space", "tab", "non-ascii", "path-like-but-valid", "empty"],
)
def test_the_header_is_checked_as_hostile_input(stack: DevStack, value: str) -> None:
    """Longer than 255, spaces, controls, non-ASCII, empty: 400 invalid_idempotency_key and no
    change; a path-like value is fine (only its hash reaches Vault)."""
    name = create_key(stack, "vault")
    conn = http.client.HTTPSConnection("127.0.0.1", stack.broker_port, context=stack.client_ssl(), timeout=15)
    try:
        conn.putrequest("POST", f"/v1/keys/{name}/rotate")
        conn.putheader(HEADER, value.encode("latin-1"))
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "2")
        conn.endheaders(b"{}")
        resp = conn.getresponse()
        status, body = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    if value == "../../sys/seal":
        assert status == 200
        assert versions(stack, name) == [1, 2]
        return
    assert status == 400, body
    assert body["code"] == "invalid_idempotency_key"
    assert value not in body["detail"] or not value
    assert versions(stack, name) == [1]


def test_two_headers_are_refused(stack: DevStack) -> None:
    """Two Idempotency-Key headers (which one counts?): 400, no change."""
    name = create_key(stack, "vault")
    conn = http.client.HTTPSConnection("127.0.0.1", stack.broker_port, context=stack.client_ssl(), timeout=15)
    try:
        conn.putrequest("POST", f"/v1/keys/{name}/rotate")
        conn.putheader(HEADER, idem())
        conn.putheader(HEADER, idem())
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        resp = conn.getresponse()
        status, body = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status == 400
    assert body["code"] == "invalid_idempotency_key"
    assert versions(stack, name) == [1]


def test_grant_create_retried_through_the_other_replica_makes_one_grant(
    stack: DevStack, second_broker: str
) -> None:
    """A grant create sent twice with one key (both replicas): one grant, the same id twice."""
    name, key = create_key(stack, "vault"), idem()
    body = {"grantee": "spiffe://keybroker.dev/app/app", "operations": ["crypto.decrypt"], "expires_in": "1h"}
    first = send(stack, f"/v1/keys/{name}/grants", key, body)
    again = send(stack, f"/v1/keys/{name}/grants", key, body, url=second_broker)
    listed = https(stack, f"/v1/keys/{name}/grants").json()["grants"]
    assert first.status == 201, first.body
    assert again.status == 201, again.body
    assert again.json()["grant_id"] == first.json()["grant_id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert len(listed) == 1


def test_policy_apply_retried_gets_its_answer_not_a_version_conflict(stack: DevStack) -> None:
    """A changing apply at version N retried with one key: the first answer again (a retry without
    the key gets 409: the document is at N+1 now). The stack's document is put back afterwards."""
    current = https(stack, "/v1/policies").json()
    original = current["document"]
    changed = json.loads(json.dumps(original))
    settings = changed.setdefault("settings", {})
    settings["grant_max_expires_in"] = int(settings.get("grant_max_expires_in", 86400)) - 1
    body = {"document": changed, "version": current["version"]}
    key = idem()
    try:
        first = https(stack, "/v1/policies", method="PUT", body=body, headers={HEADER: key})
        again = https(stack, "/v1/policies", method="PUT", body=body, headers={HEADER: key})
        plain = https(stack, "/v1/policies", method="PUT", body=body)
    finally:
        restored = https(stack, "/v1/policies", method="PUT", body={"document": original})
    assert first.status == 200, first.body
    assert first.json()["version"] == current["version"] + 1
    assert again.status == 200, again.body
    assert again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert plain.status == 409
    assert restored.status == 200, restored.body


def test_a_key_on_a_change_that_keeps_no_record_is_refused_before_it_runs(stack: DevStack) -> None:
    """PUT /v1/bindings keeps no Idempotency-Key record, so a retry would change things again: a
    request carrying the header is refused (400) and nothing changes; on a crypto call (safe to
    repeat anyway) the header is simply not needed and does no harm."""
    before = https(stack, "/v1/bindings").json()
    changed = {**before, "bindings": {**before.get("bindings", {}), "cn:idem-probe": ["application"]}}
    reply = https(stack, "/v1/bindings", method="PUT", body=changed, headers={HEADER: idem()})

    assert reply.status == 400, reply.body
    assert reply.json()["code"] == "invalid_idempotency_key"
    assert https(stack, "/v1/bindings").json() == before
    name = create_key(stack, "vault")
    sealed = send(stack, f"/v1/keys/{name}/encrypt", idem(), {"plaintext": "aGk=", "context": {}})
    assert sealed.status == 200, sealed.body


@contextmanager
def outcomes_unrecordable(stack: DevStack) -> Iterator[None]:
    """The broker's own Vault policy lets it create an idempotency record but not update one:
    every claim succeeds, every finish or abandon write is refused by Vault (403)."""
    client = stack.vault_client()
    original = client.sys.read_policy("keybroker-broker")["data"]["rules"]
    narrowed = original + '\npath "kb-kv/data/idempotency/*" {\n  capabilities = ["create", "read"]\n}\n'
    client.sys.create_or_update_policy("keybroker-broker", narrowed)
    try:
        yield
    finally:
        client.sys.create_or_update_policy("keybroker-broker", original)


def hold_ends(reply: Reply) -> datetime:
    """The time a 409 idempotency_in_progress says the first request's hold ends."""
    assert reply.status == 409, reply.body
    assert reply.json()["code"] == "idempotency_in_progress"
    assert reply.headers["Retry-After"]
    found = re.search(r"hold ends by (\S+) at the latest", reply.json()["detail"])
    assert found, reply.json()["detail"]
    return datetime.fromisoformat(found.group(1))


def lapse_hold(stack: DevStack, request_id: str) -> None:
    """End the hold of the record ``request_id`` claimed (as five minutes passing would)."""
    kv = stack.vault_client().secrets.kv.v2
    for n in kv.list_secrets(path="idempotency", mount_point="kb-kv")["data"]["keys"]:
        if n.endswith("/"):
            continue
        out = kv.read_secret_version(
            path=f"idempotency/{n}", mount_point="kb-kv", raise_on_deleted_version=True
        )
        record = out["data"]["data"]
        if record.get("request_id") == request_id:
            record["lease_until"] = iso(datetime.now(UTC) - timedelta(seconds=1))
            kv.create_or_update_secret(path=f"idempotency/{n}", secret=record, mount_point="kb-kv")
            return
    raise AssertionError(f"no record claimed by {request_id}")


def test_an_unrecorded_outcome_holds_the_key_until_a_stated_time_then_frees_it(stack: DevStack) -> None:
    """Vault refuses to record a rotation's answer: the answer still goes out; a retry gets 409
    saying when the hold ends (about the 5-minute lease), never a second rotation; once the hold
    ends a retry is done afresh."""
    name, key = create_key(stack, "vault"), idem()
    sent = datetime.now(UTC)
    with outcomes_unrecordable(stack):
        first = send(stack, f"/v1/keys/{name}/rotate", key)
        assert first.status == 200, first.body
        retry = send(stack, f"/v1/keys/{name}/rotate", key)
    ends = hold_ends(retry)
    assert sent + timedelta(minutes=4) < ends < datetime.now(UTC) + timedelta(minutes=6)
    assert hold_ends(send(stack, f"/v1/keys/{name}/rotate", key)) == ends
    assert versions(stack, name) == [1, 2]
    lapse_hold(stack, first.headers["X-Broker-Request-Id"])
    again = send(stack, f"/v1/keys/{name}/rotate", key)
    assert again.status == 200, again.body
    assert again.json()["latest_version"] == 3


def test_a_failed_request_whose_record_cannot_be_freed_says_when_it_frees(stack: DevStack) -> None:
    """A rotation refused by the key's state cannot free its record (Vault refuses the write): the
    retry gets 409 with the time the hold ends, not a stuck key; after it the retry is decided
    afresh (here: the same refusal, as the key is still revoked)."""
    name, key = create_key(stack, "vault"), idem()
    assert lifecycle(stack, name, "revoke", {"reason": "retired"}).status == 200
    with outcomes_unrecordable(stack):
        first = send(stack, f"/v1/keys/{name}/rotate", key)
        assert first.status == 409, first.body
        assert first.json()["code"] == "conflict"
    retry = send(stack, f"/v1/keys/{name}/rotate", key)
    hold_ends(retry)
    lapse_hold(stack, first.headers["X-Broker-Request-Id"])
    again = send(stack, f"/v1/keys/{name}/rotate", key)
    assert again.status == 409
    assert again.json()["code"] == "conflict"
    assert versions(stack, name) == [1]
