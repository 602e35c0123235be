"""The load generator: one worker process's share of a scenario, the same harness for every target.

A worker keeps ``inflight`` requests going for ``warmup + duration`` seconds and
counts only those that finish inside the measured window. Every answer is
checked (a ciphertext of the right shape; a decryption that gives the payload
back): a wrong answer is an error, never throughput. HTTP targets (Vault
transit, the broker) use one pooled keep-alive aiohttp session; KMS uses one
boto3 client per thread (boto3 is synchronous); the HSM is called in-process
through python-pkcs11, one session per thread under one lock (as the broker
must, see broker/backends/hsm.py).
"""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass(frozen=True)
class Target:
    """Everything a worker needs to reach one target (picklable)."""

    kind: str  # vault-direct | broker | kms-direct | hsm-direct
    op: str  # encrypt | decrypt
    payload: bytes
    context: dict[str, str]
    url: str = ""  # HTTP targets: the full endpoint URL
    headers: dict[str, str] = field(default_factory=dict)
    ciphertext: str = ""  # what decrypt sends (HTTP) / base64 blob (KMS, HSM)
    expect_prefix: str = ""  # an encrypt answer must start with this
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    key_id: str = ""  # KMS KeyId / HSM object id (hex)
    hsm_library: str = ""
    hsm_label: str = ""
    hsm_pin: str = ""
    softhsm_conf: str = ""
    kms_endpoint: str = ""


@dataclass
class Result:
    ok: int = 0
    errors: int = 0
    first_error: str = ""
    latencies: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0


def _canonical(context: dict[str, str]) -> bytes:
    import json

    return json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


def run_worker(target: Target, inflight: int, warmup: float, duration: float) -> Result:
    """Entry point in the worker process. ``cpu_seconds``: this process's CPU while it sent load."""
    if target.kind in ("vault-direct", "broker"):
        return asyncio.run(_http(target, inflight, warmup, duration))
    return _threads(target, inflight, warmup, duration)


# -- HTTP --------------------------------------------------------------------------------


def http_body(t: Target) -> dict[str, Any]:
    b64 = base64.b64encode(t.payload).decode()
    if t.kind == "vault-direct":
        aad = base64.b64encode(_canonical(t.context)).decode()
        if t.op == "encrypt":
            return {"plaintext": b64, "associated_data": aad}
        return {"ciphertext": t.ciphertext, "associated_data": aad}
    if t.op == "encrypt":
        return {"plaintext": b64, "context": t.context}
    return {"ciphertext": t.ciphertext, "context": t.context}


def _http_check(t: Target, body: Any) -> str | None:
    data = body.get("data", {}) if t.kind == "vault-direct" else body
    if t.op == "encrypt":
        got = str(data.get("ciphertext", ""))
        return None if got.startswith(t.expect_prefix) else f"bad ciphertext {got[:40]!r}"
    plain = base64.b64decode(str(data.get("plaintext", "")))
    return None if plain == t.payload else "decryption gave other bytes"


async def _http(t: Target, inflight: int, warmup: float, duration: float) -> Result:
    ctx = ssl.create_default_context(cafile=t.ca_file)
    if t.cert_file:
        ctx.load_cert_chain(t.cert_file, t.key_file)
    result = Result()
    body = http_body(t)
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    connector = aiohttp.TCPConnector(limit=inflight, ssl=ctx)
    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=connector, headers=t.headers) as session:

        async def loop() -> None:
            while True:
                began = time.perf_counter()
                if began >= stop_at:
                    return
                try:
                    async with session.post(t.url, json=body) as resp:
                        answer = await resp.json(content_type=None)
                        problem = f"HTTP {resp.status}" if resp.status != 200 else _http_check(t, answer)
                except (aiohttp.ClientError, ValueError, TimeoutError) as exc:
                    problem = f"{exc.__class__.__name__}: {exc}"
                ended = time.perf_counter()
                if ended < measure_from or ended > stop_at:
                    continue
                _count(result, problem, ended - began)

        await asyncio.gather(*(loop() for _ in range(inflight)))
    result.cpu_seconds = time.process_time() - cpu0
    return result


def _count(result: Result, problem: str | None, latency: float) -> None:
    if problem is None:
        result.ok += 1
        result.latencies.append(latency)
    else:
        result.errors += 1
        result.first_error = result.first_error or problem


# -- KMS and HSM (synchronous SDKs): threads --------------------------------------------------


def _kms_call(t: Target) -> Callable[[], str | None]:
    import boto3

    from broker.devstack.stack import DEV_AWS_ENV, KMS_REGION

    client = boto3.session.Session(
        aws_access_key_id=DEV_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DEV_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=KMS_REGION,
    ).client("kms", endpoint_url=t.kms_endpoint)
    blob = base64.b64decode(t.ciphertext) if t.ciphertext else b""

    def call() -> str | None:
        if t.op == "encrypt":
            out = client.encrypt(KeyId=t.key_id, Plaintext=t.payload, EncryptionContext=t.context)
            return None if out.get("CiphertextBlob") else "no ciphertext"
        out = client.decrypt(CiphertextBlob=blob, KeyId=t.key_id, EncryptionContext=t.context)
        return None if out["Plaintext"] == t.payload else "decryption gave other bytes"

    return call


_HSM_LOCK = threading.Lock()  # python-pkcs11 initialises SoftHSM without locking: one call at a time
# Login belongs to the application: one session holds it, the working sessions open without a PIN.
_LOGIN: list[Any] = []


def _token(pkcs11: Any, library: str, label: str) -> Any:
    """The token, before the clock starts; SoftHSM may answer GeneralError while another
    process (the broker) rewrites the token's files, so setup tries again briefly."""
    for attempt in range(5):
        try:
            return pkcs11.lib(library).get_token(token_label=label)
        except pkcs11.exceptions.GeneralError:
            if attempt == 4:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def _hsm_call(t: Target) -> Callable[[], str | None]:
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass
    from pkcs11.mechanisms import GCMParams

    from broker.devstack.stack import HSM_TOKEN_LABEL

    os.environ["SOFTHSM2_CONF"] = t.softhsm_conf
    with _HSM_LOCK:
        token = _token(pkcs11, t.hsm_library, HSM_TOKEN_LABEL)
        if not _LOGIN:
            _LOGIN.append(token.open(user_pin=t.hsm_pin))
        session = token.open()
        key = session.get_key(
            object_class=ObjectClass.SECRET_KEY,
            label=t.hsm_label,
            id=bytes.fromhex(t.key_id),
        )
    aad = _canonical(t.context)
    sealed = base64.urlsafe_b64decode(t.ciphertext) if t.ciphertext else b""

    def call() -> str | None:
        with _HSM_LOCK:
            if t.op == "encrypt":
                nonce = os.urandom(12)
                out = key.encrypt(
                    t.payload, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(nonce, aad, 128)
                )
                return None if len(out) == len(t.payload) + 16 else "bad ciphertext length"
            plain = key.decrypt(
                sealed[12:], mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(sealed[:12], aad, 128)
            )
        return None if bytes(plain) == t.payload else "decryption gave other bytes"

    return call


def _threads(t: Target, inflight: int, warmup: float, duration: float) -> Result:
    result = Result()
    lock = threading.Lock()
    make = _kms_call if t.kind == "kms-direct" else _hsm_call
    calls = [make(t) for _ in range(inflight)]  # clients and sessions made before the clock starts
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

    def loop(call: Callable[[], str | None]) -> None:
        while True:
            began = time.perf_counter()
            if began >= stop_at:
                return
            try:
                problem = call()
            except Exception as exc:  # noqa: BLE001 - every SDK failure is an error to count, not a crash
                problem = f"{exc.__class__.__name__}: {exc}"
            ended = time.perf_counter()
            if ended < measure_from or ended > stop_at:
                continue
            with lock:
                _count(result, problem, ended - began)

    threads = [threading.Thread(target=loop, args=(c,)) for c in calls]
    cpu0 = time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.cpu_seconds = time.process_time() - cpu0
    return result
