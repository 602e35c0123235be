"""The Python SDK against the real stack: every operation once through ``Client`` and through
``AsyncClient``, errors as the right exception, fail-over past a dead address and away from a
replica stopped mid-run, and no plaintext or data key in the SDK's logs or reprs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.devstack.stack import DevStack, free_port
from broker.sdk import AsyncClient, Client, DataKey, Sealed
from broker.sdk.errors import (
    Conflict,
    DecryptionFailed,
    Forbidden,
    InvalidInput,
    KeybrokerError,
    KeyStateError,
    NotFound,
    TransportError,
)
from tests.integration.conftest import extra_broker

REPO = Path(__file__).parents[2]
APP = "spiffe://keybroker.dev/app/app"


def connect(stack: DevStack, addresses: str | list[str], who: str = "admin", **options: Any) -> Client:
    """A Client with the dev certificate ``who``."""
    tls = stack.layout.tls
    return Client(
        addresses,
        ca_cert=tls / "ca.pem",
        client_cert=tls / f"{who}.crt",
        client_key=tls / f"{who}.key",
        **options,
    )


def aconnect(stack: DevStack, who: str = "admin") -> AsyncClient:
    tls = stack.layout.tls
    return AsyncClient(
        stack.broker_url,
        ca_cert=tls / "ca.pem",
        client_cert=tls / f"{who}.crt",
        client_key=tls / f"{who}.key",
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class SyncView:
    """An AsyncClient driven from synchronous test code: each method awaited on one loop, so
    the same scenario exercises both clients."""

    def __init__(self, client: AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        member = getattr(self._client, name)
        if name == "iter_audit_events":

            def collect(**kw: Any) -> Iterator[dict[str, Any]]:
                async def run() -> list[dict[str, Any]]:
                    return [row async for row in member(**kw)]

                return iter(self._loop.run_until_complete(run()))

            return collect
        if not callable(member):
            return member
        return lambda *a, **kw: self._loop.run_until_complete(member(*a, **kw))


def scenario(kb: Any, app: Any) -> None:
    """Every SDK operation once, each result checked (kb: administrator; app: the sample app)."""
    ctx = {"tenant": "acme"}
    vault, kms, signer = unique("sdk-v"), unique("sdk-k"), unique("sdk-s")
    made = kb.create_key(vault, backend="vault", environment="dev", deletion_protection=False)
    assert made["name"] == vault
    assert made["state"] == "active"
    kb.create_key(kms, backend="kms", environment="dev", tags={"team": kms})
    kb.create_key(signer, backend="hsm", environment="dev", key_type="ecdsa-p256")

    # crypto
    sealed = kb.encrypt(vault, b"card 4111", ctx)
    assert isinstance(sealed, Sealed)
    assert (sealed.key, sealed.key_version) == (vault, 1)
    assert kb.decrypt(vault, sealed.ciphertext, ctx) == b"card 4111"
    batch = kb.encrypt_batch(vault, [b"one", (b"two", {"tenant": "other"})], ctx)
    assert all(isinstance(s, Sealed) for s in batch)
    opened = kb.decrypt_batch(
        vault, [batch[0].ciphertext, (batch[1].ciphertext, {"tenant": "other"}), "kb1:x"], ctx
    )
    assert opened[:2] == [b"one", b"two"]
    assert isinstance(opened[2], KeybrokerError)
    dk = kb.generate_data_key(kms, ctx, size=32)
    assert isinstance(dk, DataKey)
    assert len(dk.plaintext) == 32
    assert dk.key == kms
    assert kb.decrypt(kms, dk.ciphertext, ctx) == dk.plaintext
    wrapped = kb.generate_data_key_without_plaintext(kms, ctx, size=16)
    assert len(kb.decrypt(kms, wrapped.ciphertext, ctx)) == 16
    moved = kb.rewrap(vault, sealed.ciphertext, ctx, to_key=kms)
    assert moved.key == kms
    assert kb.decrypt(kms, moved.ciphertext, ctx) == b"card 4111"
    signature = kb.sign(signer, b"release 1.0")
    assert signature.key == signer
    assert signature.signature.startswith(f"kb1:{signer}:1:")
    assert kb.verify(signer, signature.signature, b"release 1.0") is True
    assert kb.verify(signer, signature.signature, digest=hashlib.sha256(b"release 1.0").digest()) is True
    assert kb.verify(signer, signature.signature, b"release 2.0") is False

    # keys
    assert vault in [k["name"] for k in kb.list_keys(backend="vault")]
    assert [k["name"] for k in kb.list_keys(tag=f"team={kms}")] == [kms]
    assert kb.get_key(vault)["latest_version"] == 1
    assert kb.update_key(vault, description="sdk test")["description"] == "sdk test"
    assert kb.rotate_key(vault)["latest_version"] == 2
    assert kb.rewrap(vault, sealed.ciphertext, ctx).key_version == 2
    assert kb.suspend_key(vault)["state"] == "suspended"
    assert kb.resume_key(vault)["state"] == "active"
    assert kb.revoke_key(vault, "retired")["state"] == "deactivated"
    assert kb.schedule_destruction(vault, 7)["state"] == "pending-destruction"
    assert kb.cancel_destruction(vault)["state"] == "deactivated"

    # grants (retired by the grantee itself)
    grant = kb.create_grant(kms, APP, ["crypto.decrypt"], "1h", context_equals=ctx)
    assert [g["id"] for g in kb.list_grants(kms)] == [grant["grant_id"]]
    assert app.decrypt(kms, dk.ciphertext, ctx) == dk.plaintext
    assert app.retire_grant(kms, grant["grant_id"])["retired"]["id"] == grant["grant_id"]
    second = kb.create_grant(kms, APP, ["crypto.decrypt"], "1h")
    assert kb.revoke_grant(kms, second["grant_id"])["revoked"]["id"] == second["grant_id"]
    assert kb.list_grants(kms) == []

    # policies and bindings (written back as they were, or added and removed)
    policies = kb.get_policies()
    role = unique("sdkrole").replace("-", "x")
    made_role = kb.put_role(role, {"rules": [{"operations": ["key.read"], "keys": {"name": [kms]}}]})
    assert made_role["rules"][0]["operations"] == ["key.read"]
    assert kb.get_role(role)["rules"] == made_role["rules"]
    assert kb.delete_role(role)["deleted"] == role
    bindings = kb.get_bindings()
    assert (
        kb.put_bindings(bindings["bindings"], version=bindings["version"])["bindings"] == bindings["bindings"]
    )
    current = kb.get_policies()
    assert current["version"] > policies["version"]
    decision = kb.explain(APP, "crypto.encrypt", key=kms, context=ctx)
    assert decision["operation"] == "crypto.encrypt"
    assert isinstance(decision["allowed"], bool)

    # health, metrics, audit
    assert kb.health()["status"] == "ok"
    assert "keybroker" in kb.metrics()
    assert kb.audit_verify()["verdict"] in ("intact", "unverified")
    page = kb.audit_events(key=kms, limit=5)
    assert page["events"]
    assert page["count"] <= 5
    rows = list(kb.iter_audit_events(key=kms, source="broker", page_size=3))
    assert len(rows) >= 10
    assert all(kms in (r.get("key"), *r.get("keys", [])) for r in rows)
    assert kb.audit_public_key().startswith("-----BEGIN PUBLIC KEY-----")
    assert kb.audit_hmac("acme").startswith("hmac-sha256:")
    with pytest.raises(Conflict):
        kb.audit_epoch(unique("e"), "the log is intact: refused")
    assert kb.call("GET", f"/v1/keys/{kms}")["name"] == kms
    assert kb.request("GET", "/v1/sys/health", ok=(503,)).status == 200


def test_every_operation_through_the_sync_client(stack: DevStack) -> None:
    """Client: every method once against the real stack, results checked."""
    with (
        connect(stack, stack.broker_url) as kb,
        connect(stack, stack.broker_url, "app") as app,
    ):
        scenario(kb, app)


def test_every_operation_through_the_async_client(stack: DevStack) -> None:
    """AsyncClient: the same scenario, every method awaited."""
    loop = asyncio.new_event_loop()
    kb = aconnect(stack)
    app = aconnect(stack, "app")
    try:
        scenario(SyncView(kb, loop), SyncView(app, loop))
    finally:
        loop.run_until_complete(kb.close())
        loop.run_until_complete(app.close())
        loop.close()


def test_errors_map_to_their_exception(stack: DevStack) -> None:
    """404 NotFound, 403 Forbidden, 400 DecryptionFailed/InvalidInput, 409 KeyStateError/Conflict,
    each with the broker's code, detail and request id; a dead address is a TransportError."""
    name = unique("sdk-e")
    with (
        connect(stack, stack.broker_url) as kb,
        connect(stack, stack.broker_url, "app") as app,
    ):
        kb.create_key(name, backend="vault", environment="prod")
        sealed = kb.encrypt(name, b"x", {"a": "b"})
        with pytest.raises(NotFound) as missing:
            kb.get_key(unique("nothere"))
        with pytest.raises(Forbidden):
            app.encrypt(name, b"x")
        with pytest.raises(DecryptionFailed):
            kb.decrypt(name, sealed.ciphertext, {"a": "c"})
        with pytest.raises(InvalidInput) as bad_name:
            kb.get_key("Not-A-Name")
        with pytest.raises(Conflict) as taken:
            kb.create_key(name, backend="vault", environment="prod")
        kb.suspend_key(name)
        with pytest.raises(KeyStateError):
            kb.encrypt(name, b"x")
        kb.resume_key(name)

    assert (missing.value.status, missing.value.code) == (404, "not_found")
    assert re.fullmatch(r"[0-9a-f-]{8,}", missing.value.request_id)
    assert (bad_name.value.status, bad_name.value.code) == (400, "invalid_key_name")
    assert type(taken.value) is Conflict
    dead = f"https://127.0.0.1:{free_port()}"
    with connect(stack, dead, retries=1, backoff=0.01) as nobody, pytest.raises(TransportError):
        nobody.health()


def test_a_dead_first_address_is_skipped_and_the_live_one_sticks(stack: DevStack) -> None:
    """KEYBROKER_ADDR-style list with a port nobody listens on first: every call succeeds."""
    dead = f"https://127.0.0.1:{free_port()}"
    name = unique("sdk-f")
    with connect(stack, f"{dead},{stack.broker_url}") as kb:
        kb.create_key(name, backend="kms", environment="dev")
        sealed = kb.encrypt(name, b"payload")
        assert kb.address == stack.broker_url
        assert kb.decrypt(name, sealed.ciphertext) == b"payload"


def _load(
    work: Callable[[], None], stop: threading.Event, errors: list[BaseException], done: list[int]
) -> None:
    while not stop.is_set():
        try:
            work()
            done.append(1)
        except BaseException as exc:
            errors.append(exc)


def test_a_replica_stopped_mid_run_is_failed_over_without_a_failed_call(
    stack: DevStack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two live replicas, the first stopped while four threads encrypt and decrypt through one
    Client: no operation fails, and calls keep succeeding on the other replica."""
    with extra_broker(stack, tmp_path_factory.mktemp("sdk-replica"), "sdk-replica") as broker:
        replica, child = broker.url, broker.child
        name = unique("sdk-ha")
        with connect(stack, [replica, stack.broker_url]) as kb:
            kb.create_key(name, backend="vault", environment="dev")
            assert kb.address == replica

            def work() -> None:
                sealed = kb.encrypt(name, b"secret", {"n": "1"})
                assert kb.decrypt(name, sealed.ciphertext, {"n": "1"}) == b"secret"

            stop = threading.Event()
            errors: list[BaseException] = []
            done: list[int] = []
            threads = [threading.Thread(target=_load, args=(work, stop, errors, done)) for _ in range(4)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while len(done) < 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            before = len(done)
            child.stop()
            deadline = time.monotonic() + 30
            while len(done) < before + 40 and time.monotonic() < deadline and not errors:
                time.sleep(0.05)
            stop.set()
            for t in threads:
                t.join(30)
            after = len(done)
            address = kb.address

    assert errors == []
    assert before >= 20
    assert after >= before + 40
    assert address == stack.broker_url


def test_no_plaintext_or_data_key_in_sdk_logs_or_reprs(
    stack: DevStack, caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG, with a fail-over logged, neither the plaintext nor the data key (raw, base64
    or hex) appears in a log record, a result's repr or an error's text."""
    secret = b"TOP-SECRET-" + uuid.uuid4().hex.encode()
    name = unique("sdk-log")
    caplog.set_level(logging.DEBUG)
    dead = f"https://127.0.0.1:{free_port()}"
    with connect(stack, [dead, stack.broker_url]) as kb:
        kb.create_key(name, backend="vault", environment="dev")
        sealed = kb.encrypt(name, secret, {"t": "1"})
        dk = kb.generate_data_key(name, {"t": "1"})
        with pytest.raises(DecryptionFailed) as failed:
            kb.decrypt(name, sealed.ciphertext, {"t": "2"})
    shown = "\n".join([caplog.text, repr(sealed), repr(dk), str(dk), str(failed.value), repr(failed.value)])

    assert "no answer from" in caplog.text  # the fail-over was logged: the check saw real lines
    for needle in (secret, dk.plaintext):
        for form in (needle, base64.b64encode(needle), needle.hex().encode()):
            assert form.decode(errors="replace") not in shown


def test_the_readme_python_example_runs(stack: DevStack, tmp_path: Path) -> None:
    """The README's "Using keybroker from Python" example runs as written with the dev env."""
    import os
    import subprocess
    import sys

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using keybroker from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    tls = stack.layout.tls
    env = {
        **os.environ,
        "KEYBROKER_ADDR": f"https://127.0.0.1:{free_port()},{stack.broker_url}",
        "KEYBROKER_CACERT": str(tls / "ca.pem"),
        "KEYBROKER_CLIENT_CERT": str(tls / "admin.crt"),
        "KEYBROKER_CLIENT_KEY": str(tls / "admin.key"),
    }
    with connect(stack, stack.broker_url) as kb:
        if not any(k["name"] == "payments" for k in kb.list_keys()):
            kb.create_key("payments", backend="vault", environment="prod")
    ran = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert ran.returncode == 0, ran.stderr
    assert "card 4111" in ran.stdout


def test_the_cli_takes_several_addresses_and_fails_over(stack: DevStack) -> None:
    """KEYBROKER_ADDR with a dead address first: `keybroker keys list` and `health` still answer,
    health naming the replica that did."""
    from tests.integration.cliops import keybroker

    addresses = f"https://127.0.0.1:{free_port()},{stack.broker_url}"
    listed = keybroker(stack, "keys", "list", "--json", env={"KEYBROKER_ADDR": addresses})
    health = keybroker(stack, "health", "--addr", addresses)

    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
    assert health.returncode == 0, health.stderr
    assert health.stdout.decode().startswith(f"broker {stack.broker_url} (replica ")
    assert health.stdout.decode().splitlines()[0].endswith(": ok")


def test_a_broker_certificate_from_another_ca_is_a_tls_error_not_retried(
    stack: DevStack, tmp_path: Path
) -> None:
    """A CA that did not sign the broker: TransportError naming TLS and the setting to check, from
    both clients, without retry rounds (a certificate problem does not pass with time)."""
    from broker.devstack.localca import loopback_tls

    other_ca, _, _ = loopback_tls(tmp_path / "other")
    tls = stack.layout.tls
    cert, key = tls / "admin.crt", tls / "admin.key"
    started = time.monotonic()
    with (
        Client(stack.broker_url, backoff=2.0, ca_cert=other_ca, client_cert=cert, client_key=key) as kb,
        pytest.raises(TransportError) as sync_error,
    ):
        kb.list_keys()

    async def run() -> None:
        async with AsyncClient(
            stack.broker_url, backoff=2.0, ca_cert=other_ca, client_cert=cert, client_key=key
        ) as akb:
            await akb.list_keys()

    with pytest.raises(TransportError) as async_error:
        asyncio.run(run())
    took = time.monotonic() - started

    for error in (sync_error.value, async_error.value):
        assert str(error).startswith(
            f"TLS with the broker at {stack.broker_url} failed (CERTIFICATE_VERIFY_FAILED)"
        )
        assert "--ca-cert/KEYBROKER_CACERT" in str(error)
    assert took < 2.0  # a retry round would have paused up to 2 s
