"""The asyncio transport: one aiohttp session (connection pool) per client, created on first use."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from yarl import URL

from broker.sdk._calls import MAX_RESPONSE_BYTES, Call, Response
from broker.sdk._route import NoAnswer, Outcome, Router, Try, schedule
from broker.sdk._settings import RetryPolicy
from broker.sdk._sync import USER_AGENT, describe_closed, describe_os, describe_tls
from broker.sdk.errors import UnexpectedResponse


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ssl module's own error inside aiohttp's wrappers (which may subclass SSLError
    without its ``reason``), or None when the failure was not TLS."""
    found: ssl.SSLError | None = None
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError):
            found = seen
            if getattr(seen, "reason", None):
                return seen
        inner = getattr(seen, "certificate_error", None) or getattr(seen, "os_error", None)
        seen = inner if isinstance(inner, BaseException) and inner is not seen else seen.__cause__
    return found


def no_answer(address: str, exc: BaseException, *, sent: bool) -> NoAnswer:
    tls = _tls_cause(exc)
    if tls is not None:
        return NoAnswer(describe_tls(address, tls), sent=sent, lasting=True)
    if isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError):
        return NoAnswer(describe_closed(address), sent=sent)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return NoAnswer(describe_os(address, exc.os_error), sent=sent)
    if isinstance(exc, TimeoutError):
        return NoAnswer(f"cannot reach the broker at {address}: timed out", sent=sent)
    return NoAnswer(describe_os(address, exc), sent=sent)


class AsyncTransport:
    def __init__(
        self,
        addresses: tuple[str, ...],
        context: ssl.SSLContext,
        timeout: float,
        policy: RetryPolicy,
        idempotent_retries: bool,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.router = Router(addresses)
        self._context = context
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout)
        self._policy = policy
        self._idempotent = idempotent_retries
        self._sleep = sleep
        self._pooled: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

    def _session(self, reuse: bool) -> aiohttp.ClientSession:
        # Unsafe calls go on a connection of their own: a stale keep-alive one failing would
        # leave it unknown whether the broker did the work.
        if reuse:
            if self._pooled is None:
                self._pooled = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._context))
            return self._pooled
        if self._fresh is None:
            self._fresh = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._context, force_close=True)
            )
        return self._fresh

    async def send(self, call: Call[Any]) -> Response:
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
                    outcome = await self._attempt(step.address, call, reuse=step.reuse)
                except NoAnswer as exc:
                    outcome = exc
            else:
                await self._sleep(step)
                outcome = None

    async def _attempt(self, address: str, call: Call[Any], *, reuse: bool) -> Response:
        session = self._session(reuse)
        # encoded=True: the path is sent exactly as built (segments already quoted), never re-resolved.
        url = URL(address + call.path, encoded=True)
        headers = {"User-Agent": USER_AGENT, **call.request_headers()}
        try:
            # allow_redirects=False: aiohttp follows 307/308 with the body (plaintext, data keys)
            # to any address, plain http:// included; a broker never redirects, so a redirect is
            # an answer to report, like the blocking client's.
            async with session.request(
                call.method,
                url,
                data=call.payload(),
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as answer:
                chunks: list[bytes] = []
                size = 0
                async for chunk in answer.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        answer.close()
                        raise UnexpectedResponse(
                            answer.status, "too_large", f"the answer from {address} is too large"
                        )
                    chunks.append(chunk)
                body = b"".join(chunks)
                headers_in = {k.lower(): v for k, v in answer.headers.items()}
                return Response(answer.status, headers_in, body, address)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise no_answer(address, exc, sent=False) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise no_answer(address, exc, sent=True) from None

    async def close(self) -> None:
        for session in (self._pooled, self._fresh):
            if session is not None:
                await session.close()
        self._pooled = self._fresh = None
