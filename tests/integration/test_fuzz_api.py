"""Property-based fuzzing of every endpoint in docs/openapi.yaml (which the unit test keeps equal
to the router) with the administrator, application and a zero-role certificate.

Each endpoint first gets the catalogue of tricks the security review named (every hostile
encoding of a key name in its path, every malformed body, lone surrogates in names and contexts,
ciphertext versions spelt with other digits: those must be refused), then Hypothesis draws
requests from the spec: real and hostile names, wrong types in every documented field, odd
content types and request ids. For every request: an answer within the per-request timeout; no
5xx but a backend's real 503/504; every error an ``application/problem+json`` document with the
documented fields; a success that matches its documented schema; exactly one audit record, found
by the answer's ``X-Broker-Request-Id`` (the broker's own id; ``X-Request-Id`` echoes the caller's).
Over the whole run: the broker stays healthy, its RSS bounded, its metric labels a fixed set.

The fuzz broker is a replica of its own (its own process and audit log, sharing Vault, KMS and
the HSM), so a request that freezes it cannot hang the rest of the suite: it is restarted and
the freeze reported. Violations are collected per endpoint and certificate and reported together,
grouped, each with a reproducer. Budgets are fixed and generation is derandomised, so CI runs
the same requests every time; ``KEYBROKER_FUZZ_SCALE=5`` runs five times as many locally.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from broker.devstack.processes import Child
from broker.devstack.stack import TRUST_DOMAIN, DevStack
from tests.integration import fuzzkit
from tests.integration.conftest import ExtraBroker, extra_broker, https
from tests.integration.fuzzkit import Operation, Pools, RawReply, Request, Violation

pytestmark = pytest.mark.integration

WHO = ("zero", "app", "admin")
ZERO_STEM = "fuzz-nobody"
# An answer later than this is a hang (backend calls end by their 8 s deadline: 503, or 504 outcome_unknown).
REQUEST_TIMEOUT = float(os.environ.get("KEYBROKER_FUZZ_TIMEOUT", "10"))
# A replica that keeps freezing is restarted this often, then the rest of the run fails unsent.
MAX_RESTARTS = int(os.environ.get("KEYBROKER_FUZZ_MAX_RESTARTS", "6"))
# RSS the broker may gain over the run: caches and allocator arenas warm up, nothing grows per request.
RSS_GROWTH_KIB = 64 * 1024
SCALE = float(os.environ.get("KEYBROKER_FUZZ_SCALE", "1"))
OPS = fuzzkit.operations()
# No example database (database=None below); Hypothesis's other caches stay out of the repository too.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "keybroker-hypothesis")


def budget(op: Operation) -> int:
    """Examples per (operation, certificate): most where input is parsed, few on fixed GETs."""
    if op.path in ("/v1/audit/events", "/v1/audit/verify"):
        n = 3  # each reads the whole log (and Vault's): slow, and only the query is input
    elif op.method == "get" and not op.query_params and not op.path_params:
        n = 3
    elif op.path.endswith(("/encrypt", "/decrypt", "/rewrap", "/datakey", "/sign", "/verify")):
        n = 12
    elif op.method == "get":
        n = 5
    else:
        n = 8
    return max(1, round(n * SCALE))


class FuzzBroker:
    """A broker replica the fuzzer may freeze: restartable, with its own audit log and pid."""

    def __init__(self, stack: DevStack, first: ExtraBroker) -> None:
        self.stack, self.config, self.port = stack, first.config, first.port
        self.name = first.child.name  # a restart runs under the same name, so into the same log
        self.audit_dir = first.audit_dir
        self.contexts: dict[str, ssl.SSLContext] = {w: stack.client_ssl(self.stem(w)) for w in WHO}
        self.child: Child = first.child
        self.tail = fuzzkit.AuditTail(self.audit_dir)
        self.log = fuzzkit.LogTail(self.child.log_path)
        self.restarts = 0
        self.baseline_rss: int | None = None
        self.warm_requests: list[Request] = []
        self.policy_changed = False

    @staticmethod
    def stem(who: str) -> str:
        return ZERO_STEM if who == "zero" else who

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def restart(self) -> None:
        self.child.stop(timeout=5)
        self.child = self.stack.spawn_broker(self.name, self.config)
        self.stack.wait_healthy(self.child, self.url)
        self.restarts += 1
        self.warm_up()  # a new process: its growth is measured from here
        self.tail.read_new()

    def warm_up(self) -> None:
        """Serve each kind of request a few times, so RSS growth is measured from a warm process."""
        for request in self.warm_requests * 3:
            reply = self.send(request, "admin")
            assert reply is not None
            assert reply.status == 200, reply.body
        self.baseline_rss = fuzzkit.rss_kib(self.child.pid)

    def alive(self) -> bool:
        return self.restarts <= MAX_RESTARTS

    def send(self, request: Request, who: str) -> RawReply | None:
        return fuzzkit.exchange(self.port, self.contexts[who], request.raw(), REQUEST_TIMEOUT)

    def health(self, timeout: float = 5.0) -> RawReply | None:
        probe = Request("GET", "/v1/sys/health", [], None, "none")
        try:
            return fuzzkit.exchange(self.port, self.contexts["admin"], probe.raw(), timeout)
        except OSError:
            return None

    def backend_down(self) -> bool:
        """Whether a real backend (not the audit log) cannot serve right now, by health."""
        reply = self.health()
        if reply is None or reply.status == 200:
            return False
        try:
            parts = json.loads(reply.body)
        except ValueError:
            return False
        return any(not parts.get(c, {}).get("ok", True) for c in ("vault", "kms", "hsm", "policy"))


@pytest.fixture(scope="module")
def target(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzBroker]:
    stack.issue_client_certificate(ZERO_STEM, ZERO_STEM, "user")
    with extra_broker(stack, tmp_path_factory.mktemp("fuzz"), "broker-fuzz") as first:
        broker = FuzzBroker(stack, first)
        try:
            yield broker
        finally:
            broker.child.stop()  # a restart's process; extra_broker stops the first


def _admin(stack: DevStack, path: str, body: Any = None, method: str | None = None) -> Any:
    reply = https(stack, path, body=body, method=method)
    assert reply.status in (200, 201), (path, reply.body)
    return reply.json()


@pytest.fixture(scope="module")
def pools(stack: DevStack, target: FuzzBroker) -> Pools:
    """Real keys, ciphertexts, signatures and a grant for the fuzzer to aim at (made by the admin)."""
    tag = {"app": "app"}

    def key(name: str, backend: str, type_: str = "aes256-gcm") -> str:
        body = {"name": name, "backend": backend, "type": type_, "environment": "dev", "tags": tag}
        _admin(stack, "/v1/keys", body)
        return name

    run = (
        fuzzkit.b64(str(time.time_ns()).encode())[-6:]
        .lower()
        .replace("=", "")
        .replace("+", "")
        .replace("/", "")
    )
    keys = [key(f"fz-{run}-{b}", b) for b in ("vault", "kms", "hsm")]
    signing = [key(f"fz-{run}-sig", "vault", "ecdsa-p256")]
    victims = [key(f"fz-{run}-victim-{b}", b) for b in ("vault", "hsm")]
    ciphertexts = [
        _admin(stack, f"/v1/keys/{k}/encrypt", {"plaintext": fuzzkit.b64(b"fuzz"), "context": ctx})[
            "ciphertext"
        ]
        for k in keys
        for ctx in ({}, {"t": "a"})
    ]
    signatures = [_admin(stack, f"/v1/keys/{signing[0]}/sign", {"message": fuzzkit.b64(b"m")})["signature"]]
    app_id = f"spiffe://{TRUST_DOMAIN}/app/app"
    grant = _admin(
        stack,
        f"/v1/keys/{keys[0]}/grants",
        {"grantee": app_id, "operations": ["crypto.decrypt"], "expires_in": "1h"},
    )
    document = _admin(stack, "/v1/policies")["document"]
    headers = [(b"Content-Type", b"application/json")]
    encrypt = json.dumps({"plaintext": fuzzkit.b64(b"warm")}).encode()
    target.warm_requests = [
        *(Request("POST", f"/v1/keys/{k}/encrypt", headers, encrypt, "warm-up") for k in keys),
        *(Request("POST", f"/v1/keys/{k}/sign", headers, b'{"message": "bQ=="}', "warm-up") for k in signing),
        *(
            Request("GET", path, [], None, "warm-up")
            for path in ("/v1/keys", "/v1/policies", "/v1/audit/verify")
        ),
    ]
    target.warm_up()
    return Pools(
        keys=keys,
        signing_keys=signing,
        victims=victims,
        ciphertexts=ciphertexts,
        signatures=signatures,
        grant_ids=[grant["grant_id"], "g-missing"],
        roles=["fuzz-role", "application", "administrator"],
        principals=[
            app_id,
            f"spiffe://{TRUST_DOMAIN}/user/admin",
            f"spiffe://{TRUST_DOMAIN}/user/{ZERO_STEM}",
        ],
        policy_document=document,
    )


def restore_policy(stack: DevStack, pools: Pools) -> None:
    """Put back the policy document a fuzzed write replaced (the Vault is shared with other tests)."""
    for _ in range(10):
        version = _admin(stack, "/v1/policies")["version"]
        reply = https(
            stack, "/v1/policies", method="PUT", body={"document": pools.policy_document, "version": version}
        )
        if reply.status == 200:
            return
        time.sleep(0.1)
    raise AssertionError("could not restore the policy document after a fuzzed write")


def fuzz_one(
    stack: DevStack, target: FuzzBroker, pools: Pools, op: Operation | None, who: str, request: Request
) -> list[Violation]:
    """Send one request, check every property of its answer, keep the stack usable for the next."""
    if not target.alive():
        kind = f"not sent: the replica froze {target.restarts} times"
        return [Violation(kind, op.id if op else request.method, who, request.describe(), "-")]
    target.tail.read_new()
    started = time.monotonic()
    try:
        reply = target.send(request, who)
    except OSError as exc:
        reply = None
        answer = f"connection failed: {exc!r}"
    else:
        answer = f"no answer within {REQUEST_TIMEOUT:g}s"
    if op is not None:
        op_id = op.id
    else:
        op_id = f"raw: {request.label}" if request.verbatim is not None else f"{request.method} (any path)"
    found: list[Violation] = []
    if reply is None:
        frozen = (health := target.health()) is None or health.status != 200
        errors = "; ".join(target.log.errors())
        kind = "hang: replica frozen, restarted" if frozen else "hang or dropped connection"
        found.append(
            Violation(kind, op_id, who, request.describe(), f"{answer}; broker log: {errors or '-'}")
        )
        if frozen:
            target.restart()
            target.log = fuzzkit.LogTail(target.child.log_path)
        return found
    elapsed = time.monotonic() - started
    records = target.tail.read_new()
    checks = fuzzkit.check_answer(op, request, reply, records, target.tail.seen, target.backend_down)
    cause = target.log.cause(reply.header("x-broker-request-id")) if reply.status >= 500 else None
    for kind, detail in checks:
        # 5xx are grouped by what the broker logged as their cause.
        label = f"{kind}: {cause}" if cause and kind.startswith("5xx") else kind
        found.append(Violation(label, op_id, who, request.describe(), f"{detail} ({elapsed:.2f}s)"))
    policy_write = request.method in ("PUT", "DELETE") and request.target.startswith(
        ("/v1/policies", "/v1/bindings")
    )
    if policy_write and 200 <= reply.status < 300:
        restore_policy(stack, pools)
    return found


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("op", OPS, ids=[op.id for op in OPS])
def test_fuzz_endpoint(stack: DevStack, target: FuzzBroker, pools: Pools, op: Operation, who: str) -> None:
    """Hostile requests to one endpoint with one certificate: every answer keeps every property."""
    found: list[Violation] = []
    mine = WHO.index(who)
    for i, request in enumerate(fuzzkit.catalogue(op, pools)):
        if i % len(WHO) == mine or request.label.startswith(fuzzkit.EVERY_CERT):
            found += fuzz_one(stack, target, pools, op, who, request)

    @settings(
        max_examples=budget(op),
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(fuzzkit.request_for(op, pools))
    def run(request: Request) -> None:
        found.extend(fuzz_one(stack, target, pools, op, who, request))

    run()
    assert not found, "\n" + fuzzkit.render(found)


def _raw(start: bytes, headers: bytes = b"", body: bytes = b"") -> bytes:
    return start + b"\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n" + body


HMAC = b"POST /v1/audit/hmac HTTP/1.1"
# Methods outside RFC 9110: each must not become a metric label of its own.
ODD_METHODS = ("PROPFIND", "M-SEARCH", "FOO", "get", "X" * 60)
# Requests aiohttp's own HTTP parser sees first: each must still get problem+json and its record.
FRAMING: dict[str, bytes] = {
    "over-long path": _raw(b"GET /v1/sys/health?" + b"a" * 9000 + b" HTTP/1.1"),
    "over-long header": _raw(b"GET /v1/sys/health HTTP/1.1", b"X-Big: " + b"a" * 9000 + b"\r\n"),
    "too many headers": _raw(
        b"GET /v1/sys/health HTTP/1.1", b"".join(b"X-H%d: 1\r\n" % i for i in range(200))
    ),
    "raw UTF-8 in the path": _raw(b"GET /v1/keys/\xc3\xa9t\xc3\xa9 HTTP/1.1"),
    "bad method": _raw(b"G\xc9T /v1/sys/health HTTP/1.1"),
    "negative Content-Length": _raw(HMAC, b"Content-Length: -1\r\n", b"{}"),
    "bad chunk size": _raw(HMAC, b"Transfer-Encoding: chunked\r\n", b"zz\r\n{}\r\n0\r\n\r\n"),
    "Content-Length and chunked": _raw(
        HMAC, b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"
    ),
    "no HTTP version": b"GET /v1/sys/health\r\n\r\n",
    "NUL in the path": _raw(b"GET /v1/keys/a\x00b HTTP/1.1"),
    "CR in a header value": _raw(b"GET /v1/sys/health HTTP/1.1", b"X-Request-Id: a\rb-12345678\r\n"),
}


@pytest.mark.parametrize("who", WHO)
def test_fuzz_methods_and_framing(stack: DevStack, target: FuzzBroker, pools: Pools, who: str) -> None:
    """Malformed framing and unknown or hostile methods on every path answer problem+json with a record."""
    found: list[Violation] = []
    for name, raw in FRAMING.items():
        request = Request("RAW", "(raw)", [], None, name, verbatim=raw)
        found += fuzz_one(stack, target, pools, None, who, request)
    paths = sorted({op.path for op in OPS})

    @settings(
        max_examples=max(1, round(12 * SCALE)),
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(
        st.sampled_from(["OPTIONS", "TRACE", "CONNECT", *ODD_METHODS]),
        st.sampled_from(paths),
        st.sampled_from(pools.keys),
    )
    def run(method: str, path: str, name: str) -> None:
        target_path = path.replace("{name}", name).replace("{grant_id}", "g-1").replace("{role}", "fuzz-role")
        found.extend(
            fuzz_one(stack, target, pools, None, who, Request(method, target_path, [], None, "none"))
        )

    run()
    assert not found, "\n" + fuzzkit.render(found)


def test_fuzzed_broker_stays_healthy_and_bounded(target: FuzzBroker) -> None:
    """After the run: no restart was needed, health 200, RSS bounded, request metrics a fixed label set."""
    problems = []
    if target.restarts:
        problems.append(f"the fuzz replica froze and was restarted {target.restarts} times")
    health = target.health()
    if health is None or health.status != 200:
        problems.append(f"health after the run: {health.body[:300]!r}" if health else "health: no answer")
    if target.baseline_rss is not None:
        grown = fuzzkit.rss_kib(target.child.pid) - target.baseline_rss
        if grown >= RSS_GROWTH_KIB:
            problems.append(f"broker RSS grew by {grown} KiB over the run (limit {RSS_GROWTH_KIB})")
        elif problems:
            problems.append(f"(broker RSS grew by {grown} KiB since its last start, within the limit)")
    probe = Request("GET", "/v1/metrics", [], None, "none")
    metrics = fuzzkit.exchange(target.port, target.contexts["admin"], probe.raw(), REQUEST_TIMEOUT)
    assert metrics is not None
    assert metrics.status == 200
    labels = set(re.findall(r'keybroker_http_requests_total\{[^}]*method="([^"]*)"', metrics.body.decode()))
    if labels & set(ODD_METHODS):
        problems.append(f"client-chosen methods became metric labels: {sorted(labels & set(ODD_METHODS))}")

    assert not problems, "\n".join(problems)
