"""Expired ``Idempotency-Key`` records are erased from Vault KV by the broker's sweep, live and
in-flight ones never; and the broker's own Vault identity may delete those records and nothing
else in KV (checked with its AppRole token against Vault directly).

A replica with ``keys.scheduler_interval_seconds = 0.5`` runs the sweep; records are written with
the root token, dated as the broker dates them, so "a day later" is only their dates.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import hvac
import hvac.exceptions
import pytest

from broker.devstack.stack import DevStack
from broker.timeutil import iso
from tests.integration.conftest import extra_broker, https
from tests.integration.keyops import create_key

pytestmark = pytest.mark.integration

KV = "kb-kv"
TICK = 0.5
WAIT = 45.0  # bound on any wait for the sweep (generous: a loaded 2-core machine)


@pytest.fixture(scope="module")
def sweeper(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A broker replica whose scheduler (and so the sweep) runs every half second."""
    every_tick = {"KEYBROKER__KEYS__SCHEDULER_INTERVAL_SECONDS": str(TICK)}
    directory = tmp_path_factory.mktemp("sweep")
    with extra_broker(stack, directory, "sweep-replica", env=every_tick) as broker:
        yield broker.url


def record_name() -> str:
    return hashlib.sha256(uuid.uuid4().bytes).hexdigest()


def put_record(stack: DevStack, name: str, record: dict[str, Any]) -> None:
    stack.vault_client().secrets.kv.v2.create_or_update_secret(
        path=f"idempotency/{name}", secret=record, mount_point=KV
    )


def read_record(stack: DevStack, name: str) -> dict[str, Any] | None:
    """The record's data, or None once its metadata is gone (erased, not only soft-deleted)."""
    client = stack.vault_client()
    try:
        client.secrets.kv.v2.read_secret_metadata(path=f"idempotency/{name}", mount_point=KV)
    except hvac.exceptions.InvalidPath:
        return None
    try:
        out = client.secrets.kv.v2.read_secret_version(
            path=f"idempotency/{name}", mount_point=KV, raise_on_deleted_version=False
        )
    except hvac.exceptions.InvalidPath:
        return None  # erased between the two reads (the sweep runs every half second)
    data: dict[str, Any] | None = out["data"]["data"]
    return data


def done_record(expires_at: datetime) -> dict[str, Any]:
    created = expires_at - timedelta(days=1)
    return {
        "state": "done",
        "fingerprint": "0" * 64,
        "request_id": str(uuid.uuid4()),
        "created_at": iso(created),
        "lease_until": iso(created + timedelta(minutes=5)),
        "expires_at": iso(expires_at),
        "answer": {"status": 201, "body": {"name": "k"}, "headers": {}},
    }


def pending_record(expires_at: datetime, lease_until: datetime) -> dict[str, Any]:
    return {
        "state": "pending",
        "fingerprint": "0" * 64,
        "request_id": str(uuid.uuid4()),
        "created_at": iso(expires_at - timedelta(minutes=1)),
        "lease_until": iso(lease_until),
        "expires_at": iso(expires_at),
    }


def test_expired_records_are_erased_and_live_or_in_flight_ones_survive(stack: DevStack, sweeper: str) -> None:
    """Expired answers and expired dead claims disappear (data and metadata); a fresh answer, an
    in-flight claim past its expiry but within its lease, and a name the broker never makes stay
    exactly as they were."""
    now = datetime.now(UTC)
    expired = {
        record_name(): done_record(now - timedelta(hours=1)),
        record_name(): done_record(now - timedelta(seconds=5)),
        record_name(): pending_record(now - timedelta(hours=2), now - timedelta(hours=2)),
    }
    surviving = {
        record_name(): done_record(now + timedelta(hours=23)),
        # keys.idempotency_ttl_seconds may be shorter than the 5-minute lease: still running.
        record_name(): pending_record(now - timedelta(seconds=30), now + timedelta(minutes=5)),
        record_name(): pending_record(now + timedelta(hours=24), now + timedelta(minutes=5)),
        "not-a-record-name": done_record(now - timedelta(days=3)),
    }
    for name, record in {**expired, **surviving}.items():
        put_record(stack, name, record)

    deadline = time.monotonic() + WAIT
    while any(read_record(stack, n) is not None for n in expired):
        assert time.monotonic() < deadline, "expired idempotency records were not erased"
        time.sleep(0.3)
    # Several more passes over the survivors: still there, untouched (no tombstone written).
    time.sleep(6 * TICK)
    for name, record in surviving.items():
        assert read_record(stack, name) == record, name
    assert https(stack, "/v1/sys/health", url=sweeper).status == 200


def test_a_fresh_request_reuses_a_key_whose_record_was_erased(stack: DevStack, sweeper: str) -> None:
    """After a real request's record expired and was erased, the same Idempotency-Key starts
    afresh: the change is made again (a new version), not replayed."""
    name = create_key(stack, "vault")
    key = f"retry-{uuid.uuid4()}"
    first = https(stack, f"/v1/keys/{name}/rotate", url=sweeper, body={}, headers={"Idempotency-Key": key})
    assert first.status == 200, first.body
    client = stack.vault_client()
    listed = client.secrets.kv.v2.list_secrets(path="idempotency", mount_point=KV)["data"]["keys"]
    first_id = first.headers["X-Broker-Request-Id"]
    ours = [n for n in listed if (read_record(stack, n) or {}).get("request_id") == first_id]
    assert len(ours) == 1
    record = read_record(stack, ours[0])
    assert record is not None
    record["expires_at"] = iso(datetime.now(UTC) - timedelta(seconds=1))
    put_record(stack, ours[0], record)
    deadline = time.monotonic() + WAIT
    while read_record(stack, ours[0]) is not None:
        assert time.monotonic() < deadline, "the expired record was not erased"
        time.sleep(0.3)
    again = https(stack, f"/v1/keys/{name}/rotate", url=sweeper, body={}, headers={"Idempotency-Key": key})
    assert again.status == 200, again.body
    assert "Idempotent-Replayed" not in again.headers
    assert again.json()["latest_version"] == first.json()["latest_version"] + 1


def broker_vault_token(stack: DevStack) -> hvac.Client:
    """A Vault client holding the broker's own AppRole token (its role and secret id files)."""
    approle = stack.layout.approle_dir
    client = hvac.Client(url=stack.vault_addr, timeout=10)
    login = client.auth.approle.login(
        role_id=(approle / "role-id").read_text().strip(),
        secret_id=(approle / "secret-id").read_text().strip(),
    )
    client.token = login["auth"]["client_token"]
    return client


def status_of(client: hvac.Client, method: str, path: str) -> int:
    try:
        response = client.adapter.request(method, f"/v1/{path}", raise_exception=False)
    except hvac.exceptions.VaultError as exc:  # pragma: no cover - raise_exception=False
        raise AssertionError(str(exc)) from exc
    return int(response.status_code)


def test_the_broker_identity_may_delete_idempotency_records_and_nothing_else(stack: DevStack) -> None:
    """With the broker's AppRole token: deleting an idempotency record's metadata works; deleting
    the policy document, an audit anchor, a grant, a name one segment deeper, or soft-deleting or
    destroying a record's data is refused (403) and the entry is still there."""
    root = stack.vault_client()
    scratch = record_name()
    put_record(stack, scratch, done_record(datetime.now(UTC) + timedelta(hours=1)))
    deeper = f"{record_name()}/x"
    root.secrets.kv.v2.create_or_update_secret(path=f"idempotency/{deeper}", secret={"a": 1}, mount_point=KV)
    # An anchor of a node of its own (the stack's broker may not have checkpointed yet).
    anchor = f"anchor-sweep-{uuid.uuid4().hex[:8]}"
    root.secrets.kv.v2.create_or_update_secret(
        path=f"audit/{anchor}", secret={"seq": 1, "hash": "0" * 64}, mount_point=KV
    )
    broker = broker_vault_token(stack)

    refused = [
        ("DELETE", f"{KV}/metadata/policy/document"),
        ("DELETE", f"{KV}/metadata/audit/{anchor}"),
        ("DELETE", f"{KV}/metadata/idempotency/{deeper}"),
        ("DELETE", f"{KV}/metadata/idempotency"),
        ("DELETE", f"{KV}/data/idempotency/{scratch}"),
        ("POST", f"{KV}/destroy/idempotency/{scratch}"),
        ("POST", f"{KV}/delete/idempotency/{scratch}"),
    ]
    for method, path in refused:
        assert status_of(broker, method, path) == 403, (method, path)
    root.secrets.kv.v2.read_secret_version(
        path="policy/document", mount_point=KV, raise_on_deleted_version=True
    )
    root.secrets.kv.v2.read_secret_metadata(path=f"audit/{anchor}", mount_point=KV)
    root.secrets.kv.v2.read_secret_metadata(path=f"idempotency/{deeper}", mount_point=KV)
    assert read_record(stack, scratch) is not None

    assert status_of(broker, "DELETE", f"{KV}/metadata/idempotency/{scratch}") == 204
    assert read_record(stack, scratch) is None
    root.secrets.kv.v2.delete_metadata_and_all_versions(path=f"idempotency/{deeper}", mount_point=KV)


def test_openbao_lists_the_page_the_sweep_asks_for(stack: DevStack) -> None:
    """The sweep walks records with OpenBao's paginated LIST (``after``, ``limit``, as
    ``KvDocuments.names_page`` sends them): a page is at most ``limit`` names, strictly after
    ``after``, in order, so successive passes cover every record."""
    root = stack.vault_client()
    prefix = f"paging-{uuid.uuid4().hex[:8]}"
    names = sorted(record_name() for _ in range(5))
    for n in names:
        root.secrets.kv.v2.create_or_update_secret(path=f"{prefix}/{n}", secret={"a": 1}, mount_point=KV)

    def page(after: str | None) -> list[str]:
        params: dict[str, str | int] = {"limit": 2, **({"after": after} if after else {})}
        out = root.adapter.request("LIST", f"/v1/{KV}/metadata/{prefix}", params=params)
        return list(out["data"]["keys"])

    assert page(None) == names[:2]
    assert page(names[1]) == names[2:4]
    assert page(names[3]) == names[4:]
    for n in names:
        root.secrets.kv.v2.delete_metadata_and_all_versions(path=f"{prefix}/{n}", mount_point=KV)
