"""Which address to try next and whether to try again: the one retry/fail-over loop's rules,
shared by the sync and async transports (which only do the I/O).

- A *round* tries each address once, starting at the last one that answered (sticky).
- No answer because nothing was sent (connection refused, TLS handshake failed): the next
  address, for every call: the broker never saw the request.
- No answer after the request went out (reset, timeout, closed): the next address only for a
  call that is safe to send twice; otherwise that is the caller's error at once.
- 503 or 429 (or 409 ``idempotency_in_progress`` for a call with an Idempotency-Key): the next
  address, and another round after a jittered pause of at least ``Retry-After``, only for safe
  calls; an unsafe call gets that answer back as it is.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from broker.sdk._calls import Call, Response
from broker.sdk._settings import RetryPolicy, retry_after_seconds
from broker.sdk.errors import TransportError

log = logging.getLogger("broker.sdk")

MAYBE_DONE = "; the request may have been carried out: check before sending it again"


class NoAnswer(Exception):
    """One attempt got no HTTP answer. ``sent``: the request may have reached the broker.
    ``lasting``: trying again soon will not help (a certificate the broker does not trust)."""

    def __init__(self, reason: str, *, sent: bool, lasting: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.lasting = lasting


class Router:
    """The addresses in the order to try them; remembers the last good one (thread-safe)."""

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self.addresses = addresses
        self._good = 0
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        with self._lock:
            start = self._good
        return [self.addresses[(start + i) % len(self.addresses)] for i in range(len(self.addresses))]

    def answered(self, address: str) -> None:
        with self._lock:
            self._good = self.addresses.index(address)

    @property
    def current(self) -> str:
        with self._lock:
            return self.addresses[self._good]


def wants_retry(resp: Response, safe: bool, keyed: bool, ok: tuple[int, ...]) -> bool:
    """Whether this answer should be tried again elsewhere or later (never one the caller accepts)."""
    if not safe or resp.status in ok:
        return False
    if resp.status in (429, 503):
        return True
    if resp.status == 409 and keyed:
        try:
            doc = resp.json()
        except Exception:  # noqa: BLE001 - an unreadable 409 is simply not the in-progress one
            return False
        return isinstance(doc, dict) and doc.get("code") == "idempotency_in_progress"
    return False


@dataclass
class Attempts:
    """What the attempts of one call met, to decide the next step and the final error."""

    policy: RetryPolicy
    failures: list[tuple[str, NoAnswer]] = field(default_factory=list)
    last_answer: Response | None = None
    retry_after: float | None = None
    round_had_transient: bool = False

    def start_round(self) -> None:
        self.retry_after = None
        self.round_had_transient = False

    def no_answer(self, address: str, exc: NoAnswer) -> None:
        self.failures.append((address, exc))
        self.round_had_transient |= not exc.lasting

    def refused_answer(self, resp: Response) -> None:
        self.last_answer = resp
        self.round_had_transient = True
        wait = retry_after_seconds(resp.headers.get("retry-after"))
        if wait is not None:
            self.retry_after = max(self.retry_after or 0.0, wait)

    def pause(self, round_: int) -> float | None:
        """Seconds to wait before the next round, or None to stop now."""
        if not self.round_had_transient:
            return None
        return self.policy.pause(round_, self.retry_after)

    def give_up(self, addresses: tuple[str, ...]) -> Response:
        """The best answer to return after the last attempt: a broker's, else a TransportError."""
        if self.last_answer is not None:
            return self.last_answer
        raise transport_error(self.failures, addresses)


def transport_error(failures: list[tuple[str, NoAnswer]], addresses: tuple[str, ...]) -> TransportError:
    if len(addresses) == 1 and failures:
        return TransportError(failures[-1][1].reason)
    latest: dict[str, str] = {}
    for address, exc in failures:
        latest[address] = exc.reason
    listed = "; ".join(latest[a] for a in addresses if a in latest)
    return TransportError(f"no broker answered ({len(addresses)} addresses): {listed}")


@dataclass(frozen=True)
class Try:
    """Send the call to ``address`` (on a kept-alive connection only if ``reuse``); report back
    the answer or the NoAnswer it raised."""

    address: str
    reuse: bool


# What the transport does next: send somewhere, or sleep this many seconds and report None.
Step = Try | float
Outcome = Response | NoAnswer | None


def schedule(
    router: Router, policy: RetryPolicy, call: Call[Any], idempotent_retries: bool
) -> Generator[Step, Outcome, Response]:
    """The one retry/fail-over loop, as steps: each transport only does the I/O a step names and
    sends back what came of it; the generator's return value is the answer to give the caller."""
    keyed = call.idempotency_key is not None and idempotent_retries
    safe = call.safe or keyed
    attempts = Attempts(policy)
    for round_ in range(policy.retries + 1):
        attempts.start_round()
        for address in router.order():
            outcome = yield Try(address, reuse=safe)
            if isinstance(outcome, NoAnswer):
                attempts.no_answer(address, outcome)
                if outcome.sent and not safe:
                    raise transport_error(
                        [(address, NoAnswer(outcome.reason + MAYBE_DONE, sent=True))], (address,)
                    )
                log.debug(
                    "no answer from %s for %s %s; trying the next address", address, call.method, call.path
                )
                continue
            if outcome is None:
                raise TypeError("a Try step must be answered with a Response or a NoAnswer")
            if wants_retry(outcome, safe, keyed, call.ok):
                attempts.refused_answer(outcome)
                log.debug(
                    "%s answered %s to %s %s; trying again", address, outcome.status, call.method, call.path
                )
                continue
            if outcome.status not in (429, 503):
                router.answered(address)
            return outcome
        wait = attempts.pause(round_)
        if wait is None:
            break
        yield wait
    return attempts.give_up(router.addresses)
