"""The blocking transport: keep-alive ``http.client`` connections per address, shared by threads."""

from __future__ import annotations

import http.client
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from broker.sdk._calls import MAX_RESPONSE_BYTES, Call, Response
from broker.sdk._route import NoAnswer, Outcome, Router, Try, schedule
from broker.sdk._settings import RetryPolicy
from broker.sdk.errors import UnexpectedResponse

# Idle connections kept per address; more concurrent callers than this open (and close) their own.
MAX_IDLE = 8

USER_AGENT = "keybroker-sdk/1 (python)"


def describe_tls(address: str, exc: ssl.SSLError) -> str:
    return (
        f"TLS with the broker at {address} failed ({getattr(exc, 'reason', None) or exc}): check that "
        "--ca-cert/KEYBROKER_CACERT is the CA of the broker's certificate and that your "
        "certificate comes from the broker's client CA and has not expired"
    )


def describe_closed(address: str) -> str:
    return (
        f"the broker at {address} closed the connection without answering; it does that to "
        "a client certificate not from its client CA (check --client-cert/KEYBROKER_CLIENT_CERT)"
    )


def describe_os(address: str, exc: BaseException) -> str:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or exc.__class__.__name__
    return f"cannot reach the broker at {address}: {reason}"


def no_answer(address: str, exc: BaseException, *, sent: bool) -> NoAnswer:
    """An I/O failure as the retry loop sees it, with the line a person reads."""
    if isinstance(exc, ssl.SSLError):
        # A certificate problem stays a problem; an alert mid-stream is the broker refusing us.
        return NoAnswer(describe_tls(address, exc), sent=sent, lasting=True)
    if isinstance(exc, ConnectionResetError | http.client.RemoteDisconnected | BrokenPipeError):
        return NoAnswer(describe_closed(address), sent=sent)
    return NoAnswer(describe_os(address, exc), sent=sent)


class SyncTransport:
    def __init__(
        self,
        addresses: tuple[str, ...],
        context: ssl.SSLContext,
        timeout: float,
        policy: RetryPolicy,
        idempotent_retries: bool,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.router = Router(addresses)
        self._context = context
        self._timeout = timeout
        self._policy = policy
        self._idempotent = idempotent_retries
        self._sleep = sleep
        self._idle: dict[str, list[http.client.HTTPSConnection]] = {a: [] for a in addresses}
        self._lock = threading.Lock()
        self._closed = False

    def send(self, call: Call[Any]) -> Response:
        steps = schedule(self.router, self._policy, call, self._idempotent)
        outcome: Outcome = None
        while True:
            try:
                step = steps.send(outcome)
            except StopIteration as done:
                answer: Response = done.value
                return answer
            if isinstance(step, Try):
                try:
                    outcome = self._attempt(step.address, call, reuse=step.reuse)
                except NoAnswer as exc:
                    outcome = exc
            else:
                self._sleep(step)
                outcome = None

    def _attempt(self, address: str, call: Call[Any], *, reuse: bool) -> Response:
        conn = self._take(address) if reuse else None
        reused = conn is not None
        if conn is None:
            conn = self._connect(address)
        prefix = urllib.parse.urlsplit(address).path
        headers = {"User-Agent": USER_AGENT, **call.request_headers()}
        try:
            conn.request(call.method, prefix + call.path, body=call.payload(), headers=headers)
            answer = conn.getresponse()
            body = answer.read(MAX_RESPONSE_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if reused and not isinstance(exc, TimeoutError):
                # The broker closed this idle keep-alive connection meanwhile: once more on a new one.
                # Not after a timeout: a broker that hangs would cost a second full timeout here
                # before the next address is tried.
                return self._attempt(address, call, reuse=False)
            raise no_answer(address, exc, sent=True) from None
        if len(body) > MAX_RESPONSE_BYTES:
            conn.close()
            raise UnexpectedResponse(answer.status, "too_large", f"the answer from {address} is too large")
        if answer.will_close:
            conn.close()
        else:
            self._give(address, conn)
        headers_in = {k.lower(): v for k, v in answer.getheaders()}
        return Response(answer.status, headers_in, body, address)

    def _connect(self, address: str) -> http.client.HTTPSConnection:
        parts = urllib.parse.urlsplit(address)
        conn = http.client.HTTPSConnection(
            parts.hostname or "", parts.port or 443, context=self._context, timeout=self._timeout
        )
        try:
            conn.connect()
        except OSError as exc:  # ssl.SSLError among them: the handshake is part of connect()
            conn.close()
            raise no_answer(address, exc, sent=False) from None
        return conn

    def _take(self, address: str) -> http.client.HTTPSConnection | None:
        with self._lock:
            idle = self._idle[address]
            return idle.pop() if idle else None

    def _give(self, address: str, conn: http.client.HTTPSConnection) -> None:
        with self._lock:
            idle = self._idle[address]
            if not self._closed and len(idle) < MAX_IDLE:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            for idle in self._idle.values():
                idle.clear()
        for conn in conns:
            conn.close()
