"""The audit trail cannot be frozen, erased or evaded (issue 11, findings 2-4), on the real stack.

Frozen: a record the writer cannot encode leaves health answering. Erased: a wiped
audit directory cannot restart the chain under Vault's anchor; only a named, recorded
epoch continues it; the anchor only moves forward; checkpoints that cannot be anchored
stop the log; each node signs with its own HSM key; offline verify does not call an
unproven log intact. Evaded: a root-token Vault call reusing a broker request id is a
bypass, not evidence joined to the broker record.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvac.exceptions

from broker.devstack.processes import Child
from broker.devstack.stack import DevStack
from broker.vaultops.policy import POLICY_NAME
from tests.integration.conftest import Reply, extra_broker, https
from tests.integration.keyops import b64, create_key, encrypt, unique

ADMIN = "spiffe://keybroker.dev/user/admin"


@dataclass
class Broker:
    url: str
    node: str
    audit_dir: Path
    config: Path
    child: Child


def _answering(stack: DevStack, url: str, timeout: float = 60) -> Reply:
    """Poll health until the broker answers at all (any status); bounded."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return https(stack, "/v1/sys/health", url=url)
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@contextmanager
def own_broker(stack: DevStack, tmp: Path, audit: str = "", approle: Path | None = None) -> Iterator[Broker]:
    """A broker process of our own: its own port, node name and audit directory; ``audit`` adds
    lines to its [audit] section (the last one in the rendered config)."""
    # Waited for until it answers at all, not 200: a test may make it refuse.
    with extra_broker(stack, tmp, "broker", approle_dir=approle, extra_config=audit, wait=False) as first:
        broker = Broker(first.url, first.node, first.audit_dir, first.config, first.child)
        try:
            _answering(stack, broker.url)
            yield broker
        finally:
            broker.child.stop()  # a restart's process; extra_broker stops the first


def restart(stack: DevStack, broker: Broker) -> None:
    broker.child.stop()
    broker.child = stack.spawn_broker(f"{broker.node}-again", broker.config)
    _answering(stack, broker.url)


def anchor_doc(stack: DevStack, node: str) -> dict[str, Any] | None:
    try:
        out = stack.vault_client().secrets.kv.v2.read_secret_version(
            path=f"audit/anchor-{node}", mount_point="kb-kv", raise_on_deleted_version=True
        )
    except hvac.exceptions.InvalidPath:
        return None
    return dict(out["data"]["data"])


def wait_for(what: str, probe: Any, timeout: float = 30) -> Any:
    """Poll ``probe`` until it returns something truthy; bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def poll(probe: Any, timeout: float = 30) -> Any:
    """Like wait_for, but give back the last value instead of failing (the asserts say what is wrong)."""
    deadline = time.monotonic() + timeout
    value = probe()
    while not value and time.monotonic() < deadline:
        time.sleep(0.3)
        value = probe()
    return value


def records(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(directory.glob("audit-*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def keybroker_at(
    stack: DevStack, url: str, *args: str, who: str = "admin"
) -> subprocess.CompletedProcess[bytes]:
    tls = stack.layout.tls
    env = {
        **os.environ,
        "KEYBROKER_ADDR": url,
        "KEYBROKER_CACERT": str(tls / "ca.pem"),
        "KEYBROKER_CLIENT_CERT": str(tls / f"{who}.crt"),
        "KEYBROKER_CLIENT_KEY": str(tls / f"{who}.key"),
    }
    return subprocess.run(
        [sys.executable, "-m", "broker", *args], capture_output=True, env=env, timeout=60, check=False
    )


FAST = "checkpoint_seconds = 0.5\n"


# -- finding 2: the writer is not frozen by a string it cannot encode -----------------------


def test_surrogates_in_a_context_leave_the_writer_alive_and_recorded(stack: DevStack) -> None:
    """Lone UTF-16 surrogates in a context key and value: each request is answered promptly with its
    record written, and health stays 200 (before, the audit writer died and every request hung)."""
    name = create_key(stack, "vault")
    ids = [f"surrogate-{uuid.uuid4()}" for _ in range(2)]
    started = time.monotonic()
    replies = [
        https(
            stack,
            f"/v1/keys/{name}/encrypt",
            headers={"X-Request-Id": rid},
            body={"plaintext": b64(b"x"), "context": context},
        )
        for rid, context in zip(ids, [{"\ud800": "v"}, {"t": "a\udfffb"}], strict=True)
    ]
    health = https(stack, "/v1/sys/health")
    took = time.monotonic() - started
    mine = [r for r in records(stack.layout.audit_dir) if r.get("client_request_id") in ids]

    assert health.status == 200, health.body
    assert took < 10
    assert all(r.status != 503 for r in replies), [r.body for r in replies]
    assert sorted(r["client_request_id"] for r in mine) == sorted(ids)
    assert https(stack, "/v1/audit/verify").json()["ok"] is True


# -- finding 3: history cannot be erased, and what cannot be proven is not called intact -----


def test_a_wiped_audit_directory_is_refused_until_a_named_epoch_is_started(
    stack: DevStack, tmp_path: Path
) -> None:
    """Wipe a broker's audit directory and restart it: it writes nothing, answers 503 naming the operator
    command, and Vault's anchor stays; an app certificate cannot start an epoch; an administrator's
    new-epoch writes a first record saying who, why and which anchor it supersedes, the anchor keeps the
    epoch history, and the log verifies again."""
    with own_broker(stack, tmp_path, FAST) as broker:
        name = create_key(stack, "kms")
        assert encrypt(stack, name, b"before").status == 200
        https(stack, f"/v1/keys/{name}", url=broker.url)
        before = wait_for("an anchor", lambda: anchor_doc(stack, broker.node))
        shutil.rmtree(broker.audit_dir)
        restart(stack, broker)

        health = https(stack, "/v1/sys/health", url=broker.url)
        refused = https(stack, f"/v1/keys/{name}", url=broker.url)
        by_app = keybroker_at(
            stack, broker.url, "audit", "new-epoch", "--name", "x1", "--reason", "r", who="app"
        )
        files_while_refused = sorted(broker.audit_dir.glob("audit-*.jsonl"))
        anchor_while_refused = anchor_doc(stack, broker.node)
        started = keybroker_at(
            stack, broker.url, "audit", "new-epoch", "--name", "restore-1", "--reason", "disk replaced, INC-7"
        )
        after = https(stack, "/v1/sys/health", url=broker.url)
        used = https(stack, f"/v1/keys/{name}", url=broker.url)
        first = records(broker.audit_dir)[0]
        anchor = poll(lambda: (d := anchor_doc(stack, broker.node)) and d.get("epoch") == "restore-1" and d)
        verified = https(stack, "/v1/audit/verify", url=broker.url).json()

    assert health.status == 503
    detail = health.json()["audit"]["error"]
    assert "holds no records" in detail
    assert f"names record {before['seq']}" in detail
    assert "keybroker audit new-epoch" in detail
    assert refused.status == 503
    assert refused.json()["detail"] == detail
    assert by_app.returncode != 0
    assert files_while_refused == []
    assert anchor_while_refused == before
    assert started.returncode == 0, started.stderr
    assert after.status == 200
    assert used.status == 200
    assert (first["seq"], first["type"], first["epoch"], first["by"], first["reason"]) == (
        1,
        "epoch",
        "restore-1",
        ADMIN,
        "disk replaced, INC-7",
    )
    assert first["supersedes"] == {"epoch": "initial", "seq": before["seq"], "hash": before["hash"]}
    assert anchor is not None
    assert [(e["epoch"], e["by"], e["supersedes"]["seq"]) for e in anchor["epochs"]] == [
        ("restore-1", ADMIN, before["seq"])
    ]
    assert verified["ok"] is True, verified
    assert verified["epoch"] == "restore-1"
    assert any("epoch restore-1 began at record 1" in n for n in verified["notes"])


def test_the_anchor_only_moves_forward(stack: DevStack, tmp_path: Path) -> None:
    """Someone sets this node's Vault anchor ahead (another writer, a replayed log): the broker's next
    checkpoint does not overwrite it; the log stops with 503 and health says why."""
    with own_broker(stack, tmp_path, FAST) as broker:
        https(stack, "/v1/sys/health", url=broker.url)
        doc = wait_for("an anchor", lambda: anchor_doc(stack, broker.node))
        ahead = {**doc, "seq": int(doc["seq"]) + 1_000_000}
        stack.vault_client().secrets.kv.v2.create_or_update_secret(
            path=f"audit/anchor-{broker.node}", secret=ahead, mount_point="kb-kv"
        )
        https(stack, "/v1/keys", url=broker.url)
        health = wait_for(
            "the log to stop",
            lambda: (r := https(stack, "/v1/sys/health", url=broker.url)).status == 503 and r,
        )
        final = anchor_doc(stack, broker.node)

    assert "moved elsewhere" in health.json()["audit"]["error"]
    assert final == ahead


def _approle_without_anchor_writes(stack: DevStack, directory: Path) -> str:
    """An AppRole like the broker's whose policy may read but not write audit anchors."""
    client = stack.vault_client()
    policy = f"kb-noanchor-{uuid.uuid4().hex[:8]}"
    rules = client.sys.read_policy(name=POLICY_NAME)["data"]["rules"]
    client.sys.create_or_update_policy(
        name=policy, policy=rules + '\npath "kb-kv/data/audit/*" {\n  capabilities = ["read"]\n}\n'
    )
    client.auth.approle.create_or_update_approle(role_name=policy, token_policies=[policy], token_ttl="1h")
    directory.mkdir()
    for name, value in (
        ("role-id", client.auth.approle.read_role_id(role_name=policy)["data"]["role_id"]),
        ("secret-id", client.auth.approle.generate_secret_id(role_name=policy)["data"]["secret_id"]),
    ):
        (directory / name).write_text(value + "\n")
        (directory / name).chmod(0o600)
    return policy


def test_checkpoints_that_cannot_be_anchored_stop_the_log_until_they_can(
    stack: DevStack, tmp_path: Path
) -> None:
    """With Vault refusing the anchor write, after checkpoint_max_failures tries requests get 503 and
    health says why (before: a warning in the log, and service went on unanchored); once Vault accepts
    anchors again the log resumes by itself."""
    approle = tmp_path / "approle"
    policy = _approle_without_anchor_writes(stack, approle)
    with own_broker(stack, tmp_path, FAST + "checkpoint_max_failures = 2\n", approle=approle) as broker:
        https(stack, "/v1/keys", url=broker.url)
        stopped = wait_for(
            "the log to stop",
            lambda: (r := https(stack, "/v1/sys/health", url=broker.url)).status == 503 and r,
        )
        refused = https(stack, "/v1/keys", url=broker.url)
        client = stack.vault_client()
        client.sys.create_or_update_policy(
            name=policy, policy=client.sys.read_policy(name=POLICY_NAME)["data"]["rules"]
        )
        resumed = wait_for(
            "the log to resume",
            lambda: (r := https(stack, "/v1/sys/health", url=broker.url)).status == 200 and r,
        )
        anchored = anchor_doc(stack, broker.node)

    error = stopped.json()["audit"]["error"]
    assert "checkpoints in a row could not be signed or anchored" in error
    assert "anchoring record" in error
    assert refused.status == 503
    assert resumed.json()["audit"]["checkpoint_failures"] == 0
    assert anchored is not None


def test_each_replica_signs_with_its_own_checkpoint_key(stack: DevStack, second_broker: str) -> None:
    """Two replicas on one token: each node has its own checkpoint key (no shared label to race on)
    and both logs verify with signed checkpoints."""
    for url in (stack.broker_url, second_broker):
        https(stack, "/v1/keys", url=url)

    def checkpointed(url: str) -> dict[str, Any] | None:
        report: dict[str, Any] = https(stack, "/v1/audit/verify", url=url).json()
        return report if report["checkpoints"] and report["ok"] else None

    reports = [
        wait_for("a checkpoint", lambda u=url: checkpointed(u)) for url in (stack.broker_url, second_broker)
    ]

    assert reports[0]["public_key"] != reports[1]["public_key"]
    assert [r["verdict"] for r in reports] == ["intact", "intact"]


def test_racing_creators_of_a_checkpoint_key_agree_on_one(stack: DevStack) -> None:
    """Two signers for one node on a fresh token, both creating a pair (as two processes racing would):
    both then sign with the same key, and a lookup never fails on two objects."""
    import asyncio

    from broker.audit.signing import load_public_key, signature_checker
    from broker.backends.hsm import HsmAuditSigner, HsmClient, audit_key_label, generate_p256
    from broker.config.load import load_config

    os.environ["SOFTHSM2_CONF"] = str(stack.layout.softhsm_conf)
    node = unique("race")

    async def run() -> tuple[bytes, bytes, bytes, bytes]:
        client = HsmClient(load_config(stack.layout.broker_config).hsm)
        await client.start()
        try:

            def two_pairs(session: Any) -> None:
                for _ in range(2):
                    generate_p256(session, audit_key_label(node), os.urandom(16))

            await client.run(two_pairs, what="race")
            a, b = HsmAuditSigner(client, node=node), HsmAuditSigner(client, node=node)
            digest = os.urandom(32)
            return await a.public_key_der(), await b.public_key_der(), digest, await b.sign_digest(digest)
        finally:
            await client.close()

    key_a, key_b, digest, signature = asyncio.run(run())

    assert key_a == key_b
    assert signature_checker(load_public_key(key_a))(digest, signature)


def test_offline_verify_says_unverified_without_key_anchor_or_signed_tail(
    stack: DevStack, tmp_path: Path
) -> None:
    """verify --dir on a copy: without public key or anchor, or with records after the last checkpoint,
    the verdict is "unverified" (exit 3, distinct from broken = 1) unless --allow-unanchored."""
    copy = tmp_path / "copy"
    https(stack, "/v1/keys")
    shutil.copytree(stack.layout.audit_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    pem = tmp_path / "key.pem"
    pem.write_text(https(stack, "/v1/audit/public-key").body.decode())
    bare = keybroker_at(stack, stack.broker_url, "audit", "verify", "--dir", str(copy), "--json")
    keyed = keybroker_at(
        stack, stack.broker_url, "audit", "verify", "--dir", str(copy), "--public-key", str(pem)
    )
    allowed = keybroker_at(
        stack,
        stack.broker_url,
        "audit",
        "verify",
        "--dir",
        str(copy),
        "--public-key",
        str(pem),
        "--allow-unanchored",
    )

    report = json.loads(bare.stdout)
    assert bare.returncode == 3
    assert report["verdict"] == "unverified"
    assert any("no public key" in u for u in report["unverified"])
    assert any("no anchor" in u for u in report["unverified"])
    assert keyed.returncode == 3
    assert b"UNVERIFIED" in keyed.stdout
    assert allowed.returncode == 0, allowed.stdout
    assert b"audit log intact" in allowed.stdout


# -- finding 4: bypass detection cannot be evaded with a chosen request id -------------------


def _vault_direct(stack: DevStack, path: str, request_id: str) -> dict[str, Any]:
    """A call straight to Vault with the root token, carrying a chosen X-Request-Id."""
    request = urllib.request.Request(
        f"{stack.vault_addr}/v1/{path}",
        headers={"X-Vault-Token": stack.root_token(), "X-Request-Id": request_id},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return dict(json.loads(resp.read()))


def test_a_root_call_reusing_a_broker_request_id_is_a_bypass_not_evidence(stack: DevStack) -> None:
    """Read a transit key with the root token under the broker's request id of a real request (and under
    the caller's own X-Request-Id): the merged timeline shows both as bypasses, never joined to the record."""
    name = create_key(stack, "vault")
    client_id = f"chosen-{uuid.uuid4()}"
    reply = https(
        stack, f"/v1/keys/{name}/encrypt", headers={"X-Request-Id": client_id}, body={"plaintext": b64(b"m")}
    )
    # (Before the fix the broker sent the caller's id to Vault and had no X-Broker-Request-Id.)
    broker_id = reply.headers.get("X-Broker-Request-Id") or reply.headers["X-Request-Id"]
    direct = [
        _vault_direct(stack, f"kb-transit/keys/{name}", rid)["request_id"] for rid in {broker_id, client_id}
    ]

    rows = https(stack, f"/v1/audit/events?source=vault&key={name}").json()["events"]
    broker_rows = https(stack, f"/v1/audit/events?source=broker&key={name}").json()["events"]
    record = next(r for r in broker_rows if r["request_id"] == broker_id)
    flagged = {r["vault_request_id"]: r for r in rows if r.get("bypass")}

    assert reply.status == 200
    assert not set(direct) & {v["vault_request_id"] for v in record["vault"]}
    assert set(direct) <= set(flagged)
    assert all(flagged[d]["principal"] == "vault:root" for d in direct)
    assert f"kb-transit/encrypt/{name}" in {v["path"] for v in record["vault"]}  # its own call still joins
    assert broker_id != client_id
    assert reply.headers["X-Request-Id"] == client_id
    assert record["client_request_id"] == client_id
