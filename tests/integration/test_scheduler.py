"""The scheduler loop itself, on two broker replicas and every backend: scheduled rotations and
destructions happen exactly once per due date, and a failed backend call is retried at the next tick.

Two replicas run with ``keys.scheduler_interval_seconds = 0.5``. A due date is made to pass by
moving the key's ``last_rotated_at`` / ``destroy_after`` back in its registry entry (Vault KV,
root token): the brokers keep no state of their own, so that is all "an hour later" is to them.

The failures are real calls that fail:
- vault: the broker's own Vault ACL policy denies that one transit key's rotate and config paths
  (OpenBao answers 403), restored afterwards;
- kms: the KMS stand-in is frozen with SIGSTOP (the replicas time out after 1 s), then SIGCONT;
- hsm: the replicas load SoftHSM2 through ``p11shim/fault_switch.c``, a PKCS#11 module that
  answers CKR_DEVICE_ERROR to C_GenerateKey and C_DestroyObject while a switch file exists.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest

from broker.devstack.processes import Child
from broker.devstack.stack import DevStack, find_softhsm_library
from broker.timeutil import iso
from tests.integration.conftest import extra_broker
from tests.integration.keyops import (
    create_key,
    hsm_objects_with_label,
    lifecycle,
    registry_record,
    transit_key_status,
)
from tests.integration.shims import build_shim

TICK = 0.5  # keys.scheduler_interval_seconds of the two replicas
WAIT = 45.0  # bound on any wait for the scheduler (generous: a loaded 2-core machine)
BACKENDS = ["vault", "kms", "hsm"]


@dataclass
class Replicas:
    urls: list[str]
    children: list[Child]
    fault_file: Path

    def logs(self, stack: DevStack) -> list[Path]:
        # Every broker on the stack runs a scheduler (the stack's own and any other test's replica
        # still running, every 60 s): their work counts as well.
        return sorted({c.log_path for c in self.children} | set(stack.layout.logs.glob("*.log")))


@pytest.fixture(scope="module")
def replicas(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """Two replicas with a half-second scheduler, 1 s KMS timeouts and the fault-switch PKCS#11 module."""
    tmp = tmp_path_factory.mktemp("scheduler")
    shim = build_shim("fault_switch", tmp)
    fault_file = tmp / "hsm-fault"
    env = {
        "KEYBROKER__KEYS__SCHEDULER_INTERVAL_SECONDS": str(TICK),
        "KEYBROKER__KMS__TIMEOUT_SECONDS": "1",
        "KEYBROKER__KMS__MAX_ATTEMPTS": "1",
        "KEYBROKER__HSM__LIBRARY": str(shim),
        "KEYBROKER_SHIM_TARGET": str(find_softhsm_library()),
        "KEYBROKER_SHIM_FAULT_FILE": str(fault_file),
    }
    with ExitStack() as brokers:
        started = [
            brokers.enter_context(extra_broker(stack, tmp, f"scheduler-replica-{i}", env=env))
            for i in range(2)
        ]
        yield Replicas([b.url for b in started], [b.child for b in started], fault_file)


# -- helpers -------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)


def rewrite_record(stack: DevStack, name: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the key's registry entry as stored in Vault (check-and-set, retried on a conflict)."""
    kv = stack.vault_client().secrets.kv.v2
    for _ in range(50):
        out = kv.read_secret_version(path=f"keys/{name}", mount_point="kb-kv", raise_on_deleted_version=True)
        record, version = out["data"]["data"], out["data"]["metadata"]["version"]
        change(record)
        try:
            kv.create_or_update_secret(path=f"keys/{name}", secret=record, cas=version, mount_point="kb-kv")
        except hvac.exceptions.InvalidRequest:  # a check-and-set conflict: read again
            time.sleep(0.05)
            continue
        return
    raise AssertionError(f"could not rewrite the registry entry of {name}")


def make_rotation_due(stack: DevStack, name: str) -> None:
    """The period (1 h) ended a minute ago."""
    past = datetime.now(UTC) - timedelta(hours=1, minutes=1)
    rewrite_record(stack, name, lambda r: r.update(last_rotated_at=iso(past)))


def make_destruction_due(stack: DevStack, name: str) -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    rewrite_record(stack, name, lambda r: r.update(destroy_after=iso(past)))


def versions(stack: DevStack, name: str) -> list[int]:
    return [v["version"] for v in registry_record(stack, name)["versions"]]


def log_events(paths: list[Path], event: str, key: str) -> int:
    """How many log lines (JSON, one per line) say ``event`` about ``key``."""
    count = 0
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if key not in line or event not in line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            count += entry.get("event") == event and entry.get("key") == key
    return count


def backend_materials(stack: DevStack, backend: str, name: str) -> int:
    """How many pieces of material the backend itself holds for the key (orphans included)."""
    if backend == "vault":
        out = stack.vault_client().secrets.transit.read_key(name=name, mount_point="kb-transit")
        return int(out["data"]["latest_version"])
    if backend == "hsm":
        return hsm_objects_with_label(stack, name)
    kms = stack.kms_client()
    count = 0
    for page in kms.get_paginator("list_keys").paginate():
        for entry in page["Keys"]:
            meta = kms.describe_key(KeyId=entry["KeyId"])["KeyMetadata"]
            count += meta.get("Description") == f"keybroker key {name}"
    return count


@contextmanager
def backend_failing(stack: DevStack, replicas: Replicas, backend: str, name: str) -> Iterator[None]:
    """Make the backend's calls for this key really fail while inside."""
    if backend == "vault":
        client = stack.vault_client()
        original = client.sys.read_policy("keybroker-broker")["data"]["rules"]
        denied = "".join(
            f'\npath "kb-transit/keys/{name}{suffix}" {{\n  capabilities = ["deny"]\n}}\n'
            for suffix in ("/rotate", "/config")
        )
        client.sys.create_or_update_policy("keybroker-broker", original + denied)
        try:
            yield
        finally:
            client.sys.create_or_update_policy("keybroker-broker", original)
    elif backend == "kms":
        kms = stack.children["kms"]
        os.kill(kms.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(kms.pid, signal.SIGCONT)
    else:
        replicas.fault_file.write_text("on\n")
        try:
            yield
        finally:
            replicas.fault_file.unlink()


# -- rotation ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduled_rotation_once_per_period_across_two_replicas(
    stack: DevStack, replicas: Replicas, backend: str
) -> None:
    """Two replicas' scheduler loops (and the stack's broker) see the period end: exactly one new
    version per period, one piece of backend material, one rotation logged; twice in a row."""
    name = create_key(stack, backend, rotation_period="1h")
    for period in (2, 3):
        make_rotation_due(stack, name)
        wait_for(f"version {period}", lambda p=period: len(versions(stack, name)) >= p)  # type: ignore[misc]
        time.sleep(6 * TICK)  # several more ticks of both replicas: nothing more may happen
        assert versions(stack, name) == list(range(1, period + 1))
        assert registry_record(stack, name).get("work_claim") is None
        assert log_events(replicas.logs(stack), "key_rotated", name) == period - 1
    assert backend_materials(stack, backend, name) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_scheduled_rotation_is_retried_at_the_next_tick(
    stack: DevStack, replicas: Replicas, backend: str
) -> None:
    """A rotation whose backend call fails leaves the key due (the claim is given back), and a
    later tick rotates it once the backend works again: the period is not skipped."""
    name = create_key(stack, backend, rotation_period="1h")
    logs = replicas.logs(stack)
    with backend_failing(stack, replicas, backend, name):
        make_rotation_due(stack, name)
        wait_for("a failed scheduled rotation", lambda: log_events(logs, "scheduled_work_failed", name) >= 1)
        assert versions(stack, name) == [1]
    wait_for("the retried rotation", lambda: len(versions(stack, name)) >= 2)
    time.sleep(6 * TICK)
    record = registry_record(stack, name)
    assert [v["version"] for v in record["versions"]] == [1, 2]
    assert record.get("work_claim") is None
    # The versions above are the verdict. The log line may be missing when the recording
    # write's answer was lost under load (the write landed; the replica could not know).
    assert log_events(logs, "key_rotated", name) <= 1
    # The new period starts at the successful rotation, not at the failed attempt.
    assert datetime.fromisoformat(record["last_rotated_at"]) > datetime.now(UTC) - timedelta(minutes=5)


# -- destruction ---------------------------------------------------------------------------


def pending_destruction(stack: DevStack, backend: str) -> str:
    name = create_key(stack, backend, deletion_protection=False)
    reply = lifecycle(stack, name, "schedule-destruction", {"pending_days": 7})
    assert reply.status == 200, reply.body
    return name


def material_gone(stack: DevStack, backend: str, name: str, refs: list[str]) -> bool:
    if backend == "vault":
        return transit_key_status(stack, name) == 404
    if backend == "hsm":
        return hsm_objects_with_label(stack, name) == 0
    kms = stack.kms_client()
    return all(kms.describe_key(KeyId=r)["KeyMetadata"]["KeyState"] == "PendingDeletion" for r in refs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_scheduled_destruction_is_retried_and_done_once(
    stack: DevStack, replicas: Replicas, backend: str
) -> None:
    """At the end of the window a failing backend leaves the key pending destruction and
    unclaimed; once it works, one replica destroys the material and records it, once."""
    name = pending_destruction(stack, backend)
    refs = [v["material"] for v in registry_record(stack, name)["versions"]]
    logs = replicas.logs(stack)
    with backend_failing(stack, replicas, backend, name):
        make_destruction_due(stack, name)
        wait_for("a failed destruction", lambda: log_events(logs, "scheduled_work_failed", name) >= 1)
        assert registry_record(stack, name)["state"] == "pending-destruction"
    wait_for("the destruction", lambda: registry_record(stack, name)["state"] == "destroyed")
    time.sleep(6 * TICK)
    record = registry_record(stack, name)
    assert record.get("work_claim") is None
    assert material_gone(stack, backend, name, refs)
    # The state and the material above are the verdict. As for rotation, the log line can be
    # missing (seen once in CI with the KMS frozen); never two.
    assert log_events(logs, "key_destroyed", name) <= 1


# -- entries written around the broker -------------------------------------------------------


def test_corrupt_claims_and_entries_do_not_stop_the_scheduler(stack: DevStack, replicas: Replicas) -> None:
    """One pass meets a key whose work claim is malformed (owner missing, wrong types), one whose
    claim's lease ends in the year 2999, and one whose entry does not read at all (a bad date):
    the first two are reclaimed and rotated once, the third is logged and skipped, and a plain due
    key is rotated as usual, by replicas whose schedulers keep running."""
    malformed, far, broken, plain = (create_key(stack, "vault", rotation_period="1h") for _ in range(4))
    rewrite_record(stack, malformed, lambda r: r.update(work_claim={"work": 7, "until": ["x"]}))
    bogus = {"work": "rotate", "owner": "someone", "until": "2999-01-01T00:00:00Z"}
    rewrite_record(stack, far, lambda r: r.update(work_claim=bogus))
    good_created: list[str] = []

    def corrupt(r: dict[str, Any]) -> None:
        good_created.append(r["created_at"])
        r["created_at"] = "not a date"

    rewrite_record(stack, broken, corrupt)
    for name in (malformed, far, broken, plain):
        make_rotation_due(stack, name)
    try:
        for name in (plain, malformed, far):
            wait_for(f"{name} rotated", lambda n=name: len(versions(stack, n)) >= 2)  # type: ignore[misc]
        wait_for(
            "the unreadable entry logged",
            lambda: log_events(replicas.logs(stack), "scheduled_work_skipped", broken) >= 1,
        )
        time.sleep(6 * TICK)
        for name in (plain, malformed, far):
            record = registry_record(stack, name)
            assert [v["version"] for v in record["versions"]] == [1, 2], name
            assert record.get("work_claim") is None, name
    finally:
        rewrite_record(stack, broken, lambda r: r.update(created_at=good_created[0]))
    wait_for("the repaired key rotated", lambda: len(versions(stack, broken)) >= 2)
    assert all(child.alive() for child in replicas.children)
