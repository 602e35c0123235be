"""The HSM path: the PKCS#11 library is initialised for parallel calls, and key objects are
searched for once per session, not once per operation.

Both are checked behind ``p11shim/count_calls.c``: SoftHSM2 unchanged, with the flags
C_Initialize was given and every object search (C_FindObjectsInit) noted in a file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pkcs11
import pytest
from pkcs11 import Attribute

from broker.backends.hsm import object_label
from broker.config.load import load_config
from broker.devstack.stack import DevStack, find_softhsm_library
from tests.integration.conftest import extra_broker, https
from tests.integration.keyops import b64, create_key, unb64, unique
from tests.integration.shims import build_shim

CTX = {"tenant": "acme"}
CKF_OS_LOCKING_OK = 0x00000002  # pkcs11t.h


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The call-noting PKCS#11 module, compiled for this run (a C compiler is a test prerequisite)."""
    return build_shim("count_calls", tmp_path_factory.mktemp("p11shim"))


@contextmanager
def noted_broker(stack: DevStack, shim: Path, tmp: Path) -> Iterator[tuple[str, Path]]:
    """A broker on the stack whose HSM library is the shim; yields its URL and the shim's notes."""
    notes = tmp / "p11-notes.txt"
    with extra_broker(
        stack,
        tmp,
        "broker-p11-noted",
        env={
            "KEYBROKER__HSM__LIBRARY": str(shim),
            "KEYBROKER_SHIM_TARGET": str(find_softhsm_library()),
            "KEYBROKER_SHIM_LOG": str(notes),
        },
    ) as broker:
        yield broker.url, notes


def finds(notes: Path) -> int:
    return notes.read_text().split().count("find")


def test_library_is_initialised_with_os_locking(stack: DevStack, shim: Path, tmp_path: Path) -> None:
    """C_Initialize gets CKF_OS_LOCKING_OK (not NULL, which promises one thread), and health says so."""
    with noted_broker(stack, shim, tmp_path) as (url, notes):
        reply = https(stack, "/v1/sys/health", url=url)
        assert reply.status == 200, reply.body
        assert reply.json()["hsm"]["os_locking"] is True
    inits = [line for line in notes.read_text().splitlines() if line.startswith("init")]
    assert inits == [f"init {CKF_OS_LOCKING_OK}"], inits


def test_key_objects_are_found_once_per_session(stack: DevStack, shim: Path, tmp_path: Path) -> None:
    """40 encrypt/decrypt calls on one key search the token a handful of times, not 40."""
    with noted_broker(stack, shim, tmp_path) as (url, notes):
        name = unique("hsm-handles")
        body = {"name": name, "backend": "hsm", "environment": "dev"}
        assert https(stack, "/v1/keys", url=url, body=body).status == 201
        before = finds(notes)
        for i in range(20):
            plain = f"message {i}".encode()
            sealed = https(
                stack, f"/v1/keys/{name}/encrypt", url=url, body={"plaintext": b64(plain), "context": CTX}
            )
            assert sealed.status == 200, sealed.body
            opened = https(
                stack,
                f"/v1/keys/{name}/decrypt",
                url=url,
                body={"ciphertext": sealed.json()["ciphertext"], "context": CTX},
            )
            assert opened.status == 200, opened.body
            assert unb64(opened.json()["plaintext"]) == plain
        searched = finds(notes) - before
    # One search per worker session (2 by default), plus a checkpoint's key lookups if one falls due.
    assert searched <= 8, f"{searched} object searches for 40 operations"


def test_an_object_destroyed_elsewhere_is_not_used_from_the_cache(stack: DevStack, tmp_path: Path) -> None:
    """A version object deleted by someone else after the broker cached its handle: the next call
    fails cleanly (the handle is dropped and the search finds nothing), never with a stale object."""
    name = create_key(stack, "hsm")
    sealed = https(stack, f"/v1/keys/{name}/encrypt", body={"plaintext": b64(b"x"), "context": CTX})
    assert sealed.status == 200, sealed.body
    os.environ["SOFTHSM2_CONF"] = str(stack.layout.softhsm_conf)
    lib = pkcs11.lib(str(load_config(stack.layout.broker_config).hsm.library))
    token = lib.get_token(token_label="keybroker")
    with token.open(user_pin=stack.layout.hsm_pin.read_text().strip(), rw=True) as session:
        doomed = list(session.get_objects({Attribute.LABEL: object_label(name)}))
        assert doomed
        for obj in doomed:
            obj.destroy()
    for op, body in (
        ("decrypt", {"ciphertext": sealed.json()["ciphertext"], "context": CTX}),
        ("encrypt", {"plaintext": b64(b"y"), "context": CTX}),
    ):
        reply = https(stack, f"/v1/keys/{name}/{op}", body=body)
        assert reply.status == 404, (op, reply.status, reply.body)
        assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert https(stack, "/v1/sys/health").status == 200


def test_concurrent_calls_share_workers_and_each_record_names_its_call(stack: DevStack) -> None:
    """64 encrypts at once on an HSM key (more than the sessions, so calls queue and ride a
    worker together): every answer is right and every request's audit record names its own
    HSM call, none another's."""
    name = create_key(stack, "hsm")
    marker = f"hsm-batch-{uuid.uuid4().hex}"

    def seal(i: int) -> tuple[bytes, str]:
        plain = f"{marker} {i}".encode()
        reply = https(
            stack,
            f"/v1/keys/{name}/encrypt",
            body={"plaintext": b64(plain), "context": CTX},
            headers={"X-Request-Id": f"{marker}-{i:03d}"},
        )
        assert reply.status == 200, reply.body
        return plain, reply.json()["ciphertext"]

    with ThreadPoolExecutor(max_workers=64) as pool:
        sealed = list(pool.map(seal, range(64)))
    assert len({c for _, c in sealed}) == 64
    for plain, ciphertext in sealed[:8]:
        opened = https(stack, f"/v1/keys/{name}/decrypt", body={"ciphertext": ciphertext, "context": CTX})
        assert unb64(opened.json()["plaintext"]) == plain
    records = [
        json.loads(line)
        for path in sorted(stack.layout.audit_dir.glob("audit-*.jsonl"))
        for line in path.read_bytes().splitlines()
        if marker.encode() in line
    ]
    assert len(records) == 64, len(records)
    for record in records:
        calls = [c for c in record.get("backend_calls", []) if c.get("backend") == "hsm"]
        assert len(calls) == 1, record
