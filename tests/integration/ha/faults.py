"""Load and fault helpers for the HA tests: many client threads, timed answers, the cluster's state."""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.devstack.stack import DevStack, Replica
from tests.integration.conftest import Reply

# Longer than any answer the broker should give, so a hang shows as a slow answer, not a client error.
CLIENT_TIMEOUT = 60.0


@dataclass(frozen=True)
class Answer:
    """One answered request: when it was sent and answered (monotonic), where, and what came back."""

    started: float
    ended: float
    url: str
    n: int  # the request's number: what it sent is derived from it
    reply: Reply | None  # None: no HTTP answer at all (connection refused or cut)
    error: str = ""

    @property
    def status(self) -> int:
        return self.reply.status if self.reply is not None else 0

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    """``threads`` client threads calling ``call(url, i)`` round-robin over ``urls`` until stopped."""

    stack: DevStack
    urls: Sequence[str]
    call: Callable[[str, int], Reply]
    threads: int = 32
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _worker(self, index: int) -> None:
        n = 0
        while not self._stop.is_set():
            url = self.urls[(index + n) % len(self.urls)]
            n += 1
            number = index * 1_000_000 + n
            started = time.monotonic()
            try:
                reply = self.call(url, number)
                answer = Answer(started, time.monotonic(), url, number, reply)
            except OSError as exc:
                what = f"{exc.__class__.__name__}: {exc}"
                answer = Answer(started, time.monotonic(), url, number, None, what)
                time.sleep(0.05)
            with self._lock:
                self.answers.append(answer)

    @contextmanager
    def running(self) -> Iterator[Load]:
        workers = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(self.threads)]
        for worker in workers:
            worker.start()
        try:
            yield self
        finally:
            self._stop.set()
            for worker in workers:
                worker.join(60)
            assert not any(w.is_alive() for w in workers), "a client thread hung"


def error_window(answers: Sequence[Answer]) -> float:
    """Seconds from the first failed request's start to the last failed one's answer (0: none failed)."""
    failed = [a for a in answers if a.status != 200]
    if not failed:
        return 0.0
    return max(a.ended for a in failed) - min(a.started for a in failed)


def throughput(answers: Sequence[Answer], since: float, until: float) -> float:
    ok = [a for a in answers if a.status == 200 and since <= a.ended <= until]
    return len(ok) / max(until - since, 1e-9)


def assert_problem_503(answer: Answer) -> None:
    """A refusal during a fault: 503 problem+json with a code and Retry-After, never a traceback."""
    assert answer.reply is not None, answer.error
    reply = answer.reply
    assert reply.status == 503, (reply.status, reply.body[:300])
    assert reply.headers.get("Content-Type", "").startswith("application/problem+json"), reply.headers
    body = reply.json()
    assert body["code"] == "backend_unavailable", body
    assert reply.headers.get("Retry-After"), dict(reply.headers)


def request(
    stack: DevStack,
    url: str,
    path: str,
    body: Any = None,
    *,
    method: str | None = None,
    timeout: float = CLIENT_TIMEOUT,
) -> Reply:
    """One admin request with a long client timeout: the broker, not the client, must bound it.

    One connection per request, closed in ``finally`` whatever happens to it: under a fault the
    server can cut a reply half-way, and a socket left for the garbage collector is a
    ResourceWarning (an error in this suite) in whichever test happens to collect it."""
    data = None if body is None else json.dumps(body).encode()
    target = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(
        target.hostname or "127.0.0.1", target.port, timeout=timeout, context=stack.client_ssl("admin")
    )
    try:
        conn.request(
            method or ("POST" if data is not None else "GET"),
            path,
            body=data,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def plaintext_of(n: int) -> bytes:
    return f"message {n}".encode()


def encrypt_call(stack: DevStack, key: str) -> Callable[[str, int], Reply]:
    """Encrypt ``plaintext_of(n)``; the answer's body carries the ciphertext."""

    def call(url: str, n: int) -> Reply:
        body = {"plaintext": base64.b64encode(plaintext_of(n)).decode()}
        return request(stack, url, f"/v1/keys/{key}/encrypt", body)

    return call


def audit_request_ids(replicas: Sequence[Replica]) -> set[str]:
    """The request ids of every request record in the replicas' audit directories."""
    ids: set[str] = set()
    for replica in replicas:
        for path in sorted(Path(replica.audit_dir).glob("audit-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    record: dict[str, Any] = json.loads(line)
                except ValueError:
                    continue  # a cut final line after a kill -9
                if record.get("type") == "event" and record.get("request_id"):
                    ids.add(str(record["request_id"]))
    return ids


def broker_request_id(answer: Answer) -> str:
    assert answer.reply is not None
    return str(answer.reply.headers.get("X-Broker-Request-Id", ""))


def kill_leader(stack: DevStack) -> str:
    """kill -9 the active Vault node; its child name."""
    assert stack.cluster is not None
    leader = stack.cluster.leader()
    assert leader is not None, "no active Vault node"
    stack.children[leader.name].process.send_signal(signal.SIGKILL)
    stack.children[leader.name].process.wait(10)
    return leader.name


@contextmanager
def frozen(pid: int, seconds: float) -> Iterator[None]:
    """SIGSTOP ``pid`` for the body (at least ``seconds``), then SIGCONT, whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    try:
        yield
        time.sleep(max(seconds - (time.monotonic() - started), 0))
    finally:
        os.kill(pid, signal.SIGCONT)


def kms_deadline_env(deadline: float) -> dict[str, str]:
    """A broker's environment for KMS calls that give up after ``deadline`` s (1 s an attempt, 3 attempts)."""
    return {
        "KEYBROKER__KMS__TIMEOUT_SECONDS": "1",
        "KEYBROKER__KMS__MAX_ATTEMPTS": "3",
        "KEYBROKER__KMS__DEADLINE_SECONDS": str(deadline),
    }


def wait_cluster_whole(stack: DevStack, timeout: float = 60) -> None:
    """Until the three nodes are voters again and one is active (bounded)."""
    assert stack.cluster is not None
    stack.cluster.wait_formed(stack.children, timeout=timeout)
    deadline = time.monotonic() + timeout
    while stack.cluster.leader() is None:
        assert time.monotonic() < deadline, "no active Vault node"
        time.sleep(0.2)


def decrypt_all(stack: DevStack, url: str, key: str, answers: Sequence[Answer]) -> list[int]:
    """Decrypt every ciphertext the answers carry, 100 a call; the numbers of those that do not
    give back what was sent."""
    sealed = [(a.n, a.reply.json()["ciphertext"]) for a in answers if a.reply is not None and a.status == 200]
    bad = []
    for start in range(0, len(sealed), 100):
        chunk = sealed[start : start + 100]
        body = {"batch": [{"ciphertext": c} for _, c in chunk]}
        reply = request(stack, url, f"/v1/keys/{key}/decrypt", body)
        assert reply.status == 200, reply.body[:300]
        for (n, _), item in zip(chunk, reply.json()["batch"], strict=True):
            if "plaintext" not in item or base64.b64decode(item["plaintext"]) != plaintext_of(n):
                bad.append(n)
    return bad


def create_key(stack: DevStack, name: str, backend: str = "vault") -> None:
    reply = request(
        stack, stack.replicas[0].url, "/v1/keys", {"name": name, "backend": backend, "environment": "dev"}
    )
    assert reply.status == 201, reply.body[:300]


def lead_where_a_replica_is(stack: DevStack, attempts: int = 8) -> set[str]:
    """Step the leader down until it is a Vault node some broker replica sends its calls to, so a
    kill of the leader is a kill of that replica's node; the replicas on it (bounded tries)."""
    assert stack.cluster is not None
    for _ in range(attempts):
        on = {r.name: request(stack, r.url, "/v1/sys/health").json()["vault"]["node"] for r in stack.replicas}
        leader = stack.cluster.leader()
        if leader is not None and leader.addr in on.values():
            return {name for name, node in on.items() if node == leader.addr}
        stack.cluster._root_call("PUT", "sys/step-down")
        deadline = time.monotonic() + 20
        while stack.cluster.leader() in (None, leader) and time.monotonic() < deadline:
            time.sleep(0.2)
    raise AssertionError("the leader never moved to a node a replica uses")
