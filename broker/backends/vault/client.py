"""Vault's HTTP API: one pooled aiohttp session, AppRole login, token renewal, errors mapped once.

With several node addresses (a raft cluster) every call goes to the node that last
served, and moves on when a node cannot serve: a connection refused, a sealed node, a
standby without a leader (nothing was done: any call may go elsewhere) or a timeout, a
cut connection, a failed forward (maybe done: only calls safe to repeat are retried,
once; the rest fail fast with 503). Every call has a deadline, attempts included.

hvac is synchronous and used only for bootstrap and admin commands
(``broker.vaultops``); the broker's own calls go through :class:`VaultClient`.
Every call carries the broker-generated request id as ``X-Request-Id`` (a
``kb-bg-`` one outside a request) for people reading Vault's log; what joins Vault's
audit entries to the broker's records is Vault's own request id, noted from each
response (see :func:`_note_call`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from broker.config.model import VaultConfig
from broker.config.secrets import read_secret_file
from broker.errors import (
    BackendError,
    BackendTimeout,
    BadGateway,
    BadRequest,
    BrokerError,
    NotFound,
    OutcomeUnknown,
    Unavailable,
)
from broker.log import get_logger
from broker.requestvars import note_backend_call, outgoing_request_id, unnumbered

log = get_logger(__name__)
BACKEND = "vault"
# How long to wait before retrying a failed login, growing to the cap.
_LOGIN_RETRY = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


# A fixed part of a Vault path (a mount, an endpoint word): configuration or code, never a caller.
_FIXED_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def vault_path(base: str, *segments: str) -> str:
    """The one way to build a Vault API path: ``v1/<base>/<segment>/...``.

    ``base`` is a fixed "/"-separated path (mount and endpoint, e.g. ``kv/data/keys``).
    Each of ``segments`` is ONE path segment that may come from a caller (a key name):
    it is percent-encoded whole, so ``?``, ``#`` and ``%`` cannot add a query or a
    fragment. Some things no encoding makes safe, so they are refused outright: dot
    segments (the HTTP client and Vault normalise ``..``, even as ``%2E%2E``), ``/`` and
    ``\\`` (Vault routes on the decoded path, where ``%2F`` is a separator again),
    control characters and lone surrogates. Names are validated against their own rule
    earlier; this is the last line, not the first.
    """
    fixed = base.strip("/").split("/")
    if not all(_FIXED_SEGMENT.fullmatch(part) for part in fixed):
        raise ValueError(f"not a fixed Vault path: {base!r}")
    encoded = []
    for segment in segments:
        if segment in ("", ".", "..") or "/" in segment or "\\" in segment or not segment.isprintable():
            raise BadRequest("a name is not usable as a Vault path segment")
        try:
            segment.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("a name is not usable as a Vault path segment") from None
        encoded.append(urllib.parse.quote(segment, safe=""))
    return "/".join(("v1", *fixed, *encoded))


def _note_call(what: str, path: str, status: int, sent_id: str, data: Any, with_token: bool) -> None:
    """Note one answered call for the audit record (the request's, or the next background one).

    Vault's own request id (the response body's ``request_id``, the ``request.id`` of its
    audit entry; no caller chooses it) is what joins the entry to the record. A call answered
    without one (204, an error body) is noted by status, the X-Request-Id sent and the path;
    the merge joins such a note to at most one matching entry within the record's time window.
    Calls without a token (seal status, leader) are never under the broker's identity, so an
    unnumbered one needs no note.
    """
    request_id = data.get("request_id") if isinstance(data, dict) else None
    if request_id and isinstance(request_id, str):
        note_backend_call(BACKEND, what, request_id)
        return
    if not with_token:
        return
    audited = urllib.parse.unquote(path.partition("?")[0]).removeprefix("v1/")
    note_backend_call(BACKEND, what, unnumbered(status, sent_id, audited))


class VaultHTTPError(Exception):
    """Vault answered with an error status; translated at the boundary."""

    def __init__(self, status: int, errors: list[str]) -> None:
        super().__init__(f"HTTP {status}: {'; '.join(errors) or 'no detail'}")
        self.status = status
        self.errors = errors


@contextlib.contextmanager
def map_vault_errors(what: str) -> Iterator[None]:
    """Translate transport and HTTP failures talking to Vault into broker errors."""
    try:
        yield
    except VaultHTTPError as exc:
        if exc.status == 404:
            raise NotFound(f"vault: {what}: not found") from exc
        kind = Unavailable if exc.status in (429, 503) else BadGateway
        raise kind(
            f"vault: {what}: {exc}", backend=BACKEND, upstream_status=exc.status, reasons=tuple(exc.errors)
        ) from exc
    except TimeoutError as exc:
        raise BackendTimeout(f"vault: {what}: timed out", backend=BACKEND) from exc
    except aiohttp.ClientConnectionError as exc:
        raise Unavailable(
            f"vault: {what}: cannot connect ({exc.__class__.__name__})", backend=BACKEND
        ) from exc
    except aiohttp.ClientError as exc:
        raise BadGateway(f"vault: {what}: {exc.__class__.__name__}", backend=BACKEND) from exc
    except ValueError as exc:  # a body that is not JSON
        raise BadGateway(f"vault: {what}: unreadable response", backend=BACKEND) from exc


class _Outcome(enum.Enum):
    NOT_DONE = "not_done"  # the node did nothing with the call: any call may go to another node
    MAYBE_DONE = "maybe_done"  # the node may have done it: only calls safe to repeat go elsewhere


# A standby that cannot reach an active node answers 500 with one of these (it did nothing);
# a failed forward or a leadership lost while committing may have been applied.
_NOT_ACTIVE = ("node not active", "active cluster node not found", "vault is sealed", "standby")
_LEADER_TROUBLE = ("leader", "forward", "leadership")


# sys/health answers these for a node that is not the active one (standby, performance standby,
# not initialised, sealed); each is a state to report, not an error.
_HEALTH_STATES = {429: "standby", 473: "standby", 501: "uninitialized", 503: "sealed"}
# Between two rounds over every node when all refused: doubling from the first to the second.
_ROUND_PAUSE = 0.1
_ROUND_PAUSE_MAX = 1.0
# Each node's health probe: short, so a frozen node cannot hold up the broker's health answer.
_PEER_PROBE_SECONDS = 2.0


class _NodeFailed(Exception):
    """One attempt at one node failed in a way another node might not."""

    def __init__(self, outcome: _Outcome, error: BrokerError) -> None:
        super().__init__(str(error))
        self.outcome = outcome
        self.error = error


def _node_failure(exc: BaseException) -> _Outcome | None:
    """Whether a failed attempt says the node (not the call) is the problem, and how far it got."""
    if isinstance(exc, VaultHTTPError):
        reasons = " ".join(exc.errors).lower()
        if exc.status == 503 or 300 <= exc.status < 400:
            return _Outcome.NOT_DONE
        if exc.status == 500 and any(text in reasons for text in _NOT_ACTIVE):
            return _Outcome.NOT_DONE
        if exc.status in (500, 502, 504) and any(text in reasons for text in _LEADER_TROUBLE):
            return _Outcome.MAYBE_DONE
        return None
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _Outcome.NOT_DONE  # no connection was made
    if isinstance(exc, TimeoutError | aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return _Outcome.MAYBE_DONE
    return None


@dataclass
class _Token:
    value: str
    accessor: str
    ttl: float
    renewable: bool
    obtained_at: float


class VaultClient:
    """Authenticated access to Vault for the broker's hot path and health checks."""

    def __init__(self, config: VaultConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._token: _Token | None = None
        self._login_lock = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = None
        self.logins = 0
        self.renewals = 0
        self.nodes = config.nodes
        # The node that served last: tried first. A failed node rests until its time comes.
        self._current = 0
        self._resting: dict[int, float] = {}
        self.failovers = 0

    @property
    def current_node(self) -> str:
        return self.nodes[self._current]

    async def start(self) -> None:
        ssl_ctx: ssl.SSLContext | bool = True
        if self._config.ca_file is not None:
            ssl_ctx = ssl.create_default_context(cafile=str(self._config.ca_file))
        connector = aiohttp.TCPConnector(limit=128, ssl=ssl_ctx, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._config.timeout_seconds),
        )
        # Credentials are checked now so a missing file stops start-up with a clear error.
        self._credentials()
        try:
            await self.login()
        except (Unavailable, BadGateway, BackendTimeout) as exc:
            log.warning("vault_login_failed_at_start", error=str(exc))
        self._renewer = asyncio.create_task(self._renew_loop(), name="vault-token-renewer")

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._session is not None:
            await self._session.close()

    def _credentials(self) -> tuple[str, str]:
        return (
            read_secret_file(self._config.role_id_file, "vault.role_id_file"),
            read_secret_file(self._config.secret_id_file, "vault.secret_id_file"),
        )

    @property
    def token_age(self) -> float | None:
        return None if self._token is None else self._clock() - self._token.obtained_at

    async def login(self) -> None:
        """Log in with AppRole and replace the current token; revoke the old one."""
        async with self._login_lock:
            role_id, secret_id = self._credentials()
            body = await self._raw(
                "POST",
                vault_path(f"auth/{self._config.approle_mount}", "login"),
                {"role_id": role_id, "secret_id": secret_id},
                token=None,
                what="approle login",
                # A repeated login makes one more token, which expires unused: harmless.
                repeatable=True,
            )
            old = self._token
            self._token = self._token_from(body)
            self.logins += 1
            log.info("vault_login", ttl=self._token.ttl, renewable=self._token.renewable)
        if old is not None:
            with contextlib.suppress(Exception):
                await self._raw(
                    "POST",
                    "v1/auth/token/revoke-self",
                    None,
                    token=old.value,
                    what="revoke old token",
                    repeatable=True,
                )

    def _token_from(self, body: dict[str, Any]) -> _Token:
        auth = body.get("auth")
        token = auth.get("client_token") if isinstance(auth, dict) else None
        if not isinstance(auth, dict) or not isinstance(token, str) or not token:
            raise BadGateway("vault: login answered without a token", backend=BACKEND)
        lease = auth.get("lease_duration") or 0
        if not isinstance(lease, int | float) or isinstance(lease, bool) or not 0 <= lease < 2**31:
            raise BadGateway("vault: login answered with an unreadable lease_duration", backend=BACKEND)
        return _Token(
            value=token,
            accessor=str(auth.get("accessor", "")),
            ttl=float(lease),
            renewable=bool(auth.get("renewable")),
            obtained_at=self._clock(),
        )

    async def renew(self) -> None:
        """Renew the token; log in afresh when it cannot be renewed or nears its max TTL."""
        token = self._token
        if token is None or not token.renewable or token.ttl <= 0:
            await self.login()
            return
        try:
            body = await self._raw(
                "POST", "v1/auth/token/renew-self", {}, token=token.value, what="token renew", repeatable=True
            )
        except (Unavailable, BadGateway, BackendTimeout, NotFound) as exc:
            log.info("vault_renew_failed_relogin", error=str(exc))
            await self.login()
            return
        renewed = self._token_from(body)
        self.renewals += 1
        if renewed.ttl < token.ttl * self._config.renew_fraction:
            # Max TTL is close: renewals only shrink from here, so start a fresh token.
            log.info("vault_token_near_max_ttl_relogin", remaining=renewed.ttl)
            await self.login()
            return
        self._token = renewed
        log.info("vault_token_renewed", ttl=renewed.ttl)

    async def _renew_loop(self) -> None:
        attempt = 0
        while True:
            token = self._token
            if token is None:
                await asyncio.sleep(_LOGIN_RETRY[min(attempt, len(_LOGIN_RETRY) - 1)])
            else:
                due = token.obtained_at + token.ttl * self._config.renew_fraction
                await asyncio.sleep(max(due - self._clock(), 0.05))
            try:
                await (self.login() if self._token is None else self.renew())
                attempt = 0
            except Exception as exc:
                # Whatever failed (a refused login, an answer it could not read), the renewer must
                # keep going: a dead one leaves every later request to log in again on its own 403.
                if isinstance(exc, BrokerError):
                    log.warning("vault_token_refresh_failed", error=str(exc), attempt=attempt)
                else:
                    log.exception("vault_token_refresh_crashed", attempt=attempt)
                await asyncio.sleep(_LOGIN_RETRY[min(attempt, len(_LOGIN_RETRY) - 1)])
                attempt += 1

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        what: str,
        repeatable: bool | None = None,
    ) -> dict[str, Any]:
        """An authenticated call; a 403 (expired or revoked token) triggers one re-login and retry.

        ``repeatable``: doing the call twice has the effect of doing it once (default: GET and
        DELETE are, other methods are not). Only such a call is sent to a second node after
        the first may have done it (a timeout, a cut connection, a failed forward).
        """
        if repeatable is None:
            repeatable = method in ("GET", "DELETE")
        token = self._token or await self._login_and_get()
        try:
            return await self._raw(method, path, body, token=token.value, what=what, repeatable=repeatable)
        except BadGateway as exc:
            if exc.upstream_status != 403:
                raise
        token = await self._login_and_get()
        return await self._raw(method, path, body, token=token.value, what=what, repeatable=repeatable)

    async def _login_and_get(self) -> _Token:
        await self.login()
        if self._token is None:
            raise Unavailable("vault: login produced no token", backend=BACKEND)
        return self._token

    async def unauthenticated(
        self, path: str, *, what: str, ok_statuses: tuple[int, ...] = ()
    ) -> dict[str, Any]:
        return await self._raw(
            "GET", path, None, token=None, what=what, ok_statuses=ok_statuses, repeatable=True
        )

    def _order(self, now: float) -> list[int]:
        """Nodes in the order to try: the current one, then the others; resting ones last."""
        count = len(self.nodes)
        ring = [(self._current + i) % count for i in range(count)]
        return sorted(ring, key=lambda i: self._resting.get(i, 0.0) > now)

    async def _raw(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        token: str | None,
        what: str,
        ok_statuses: tuple[int, ...] = (),
        repeatable: bool = False,
    ) -> dict[str, Any]:
        """One call, moved to another node while nodes fail, within ``deadline_seconds``.

        When every node refused without doing anything (an election in progress: standbys
        without a leader, redirects to a node that is not active yet), the call waits a little
        and goes round again, until the deadline: a leader change then costs time, not an error.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.deadline_seconds
        maybe_done = 0
        pause = _ROUND_PAUSE
        while True:
            failures: list[tuple[str, BrokerError]] = []
            give_up = False
            for index in self._order(loop.time()):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    give_up = True
                    break
                try:
                    data = await self._attempt(
                        index,
                        method,
                        path,
                        body,
                        token=token,
                        what=what,
                        ok_statuses=ok_statuses,
                        timeout=min(self._config.timeout_seconds, remaining),
                    )
                except _NodeFailed as failed:
                    self._resting[index] = loop.time() + self._config.node_retry_seconds
                    failures.append((self.nodes[index], failed.error))
                    if failed.outcome is _Outcome.MAYBE_DONE and not repeatable:
                        # Sent, and no answer: the node may have done it. Not a 503 to retry.
                        raise OutcomeUnknown(
                            f"vault: {what}: {failed.error.detail}; Vault may still carry it out: "
                            "nothing was recorded, read the key before trying again",
                            backend=BACKEND,
                        ) from failed.error
                    if len(self.nodes) == 1:
                        raise failed.error from failed.error.__cause__
                    log.warning(
                        "vault_node_failed", node=self.nodes[index], what=what, error=failed.error.detail
                    )
                    if failed.outcome is _Outcome.MAYBE_DONE:
                        maybe_done += 1
                        # Once only, and only what is safe to repeat: the first node may have done it.
                        if not repeatable or maybe_done > 1:
                            give_up = True
                            break
                    continue
                if index != self._current:
                    self.failovers += 1
                    log.info("vault_node_changed", node=self.nodes[index], previous=self.nodes[self._current])
                    self._current = index
                self._resting.pop(index, None)
                return data
            if give_up or deadline - loop.time() <= pause:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, _ROUND_PAUSE_MAX)
        if not failures:
            raise Unavailable(f"vault: {what}: no time left to try a node", backend=BACKEND)
        summary = "; ".join(f"{node}: {error.detail}" for node, error in failures)
        last = failures[-1][1]
        raise Unavailable(
            f"vault: {what}: no node could serve it ({summary})",
            backend=BACKEND,
            upstream_status=last.upstream_status if isinstance(last, BackendError) else None,
            reasons=last.reasons if isinstance(last, BackendError) else (),
        )

    async def _attempt(
        self,
        index: int,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        token: str | None,
        what: str,
        ok_statuses: tuple[int, ...],
        timeout: float,  # noqa: ASYNC109 - aiohttp's per-request timeout, not a wrapper around the call
    ) -> dict[str, Any]:
        """One request to one node; raises _NodeFailed when another node might serve it."""
        if self._session is None:
            raise Unavailable("vault client is not started", backend=BACKEND)
        headers = {}
        if token is not None:
            headers["X-Vault-Token"] = token
        sent_id = headers["X-Request-Id"] = outgoing_request_id()
        url = f"{self.nodes[index]}/{path}"
        try:
            with map_vault_errors(what):
                return await self._exchange(
                    method, url, path, body, headers, sent_id, what, ok_statuses, timeout, token is not None
                )
        except BrokerError as mapped:
            cause = mapped.__cause__
            outcome = _node_failure(cause) if cause is not None else None
            if outcome is None:
                raise
            raise _NodeFailed(outcome, mapped) from mapped

    async def _exchange(
        self,
        method: str,
        url: str,
        path: str,
        body: dict[str, Any] | None,
        headers: dict[str, str],
        sent_id: str,
        what: str,
        ok_statuses: tuple[int, ...],
        timeout: float,  # noqa: ASYNC109 - aiohttp's per-request timeout
        with_token: bool,
    ) -> dict[str, Any]:
        if self._session is None:
            raise Unavailable("vault client is not started", backend=BACKEND)
        async with self._session.request(
            method,
            url,
            json=body,
            headers=headers,
            # A standby may redirect to the active node: the broker chooses its nodes itself.
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            if 300 <= resp.status < 400:
                raise VaultHTTPError(resp.status, [f"redirected to {resp.headers.get('Location', '?')}"])
            data: Any = {} if resp.status == 204 or resp.content_length == 0 else None
            try:
                if data is None:
                    data = await resp.json(content_type=None)
            finally:
                _note_call(what, path, resp.status, sent_id, data, with_token)
            if resp.status >= 400 and resp.status not in ok_statuses:
                errors = data.get("errors", []) if isinstance(data, dict) else []
                raise VaultHTTPError(resp.status, [str(e) for e in errors])
            return data if isinstance(data, dict) else {}

    async def health(self) -> dict[str, Any]:
        """Seal state, HA leadership, each configured node's state and whether the broker's token works."""
        seal = await self.unauthenticated("v1/sys/seal-status", what="seal status")
        report: dict[str, Any] = {
            "initialized": bool(seal.get("initialized")),
            "sealed": bool(seal.get("sealed", True)),
            "seal_type": seal.get("type", ""),
            "version": seal.get("version", ""),
            # The node this replica talks to now (the one that answered the seal status).
            "node": self.current_node,
        }
        if report["initialized"] and not report["sealed"]:
            leader = await self.unauthenticated("v1/sys/leader", what="leader status", ok_statuses=(503,))
            report["ha_enabled"] = bool(leader.get("ha_enabled"))
            report["is_leader"] = bool(leader.get("is_self"))
            report["leader_address"] = leader.get("leader_address", "")
            await self.request("GET", "v1/auth/token/lookup-self", what="token lookup")
            report["auth"] = "ok"
        report["peers"] = await self.peers()
        report["ok"] = report["initialized"] and not report["sealed"] and report.get("auth") == "ok"
        return report

    async def peers(self) -> list[dict[str, Any]]:
        """Every configured node as it answers ``sys/health`` itself: active, standby, sealed, ...

        Asked of each node at once, each within ``_PEER_PROBE_SECONDS``, with no token (the
        broker's policy grants nothing under ``sys/``), so a down node shows as unreachable
        without slowing the health answer.
        """
        return list(await asyncio.gather(*(self._peer(i) for i in range(len(self.nodes)))))

    async def _peer(self, index: int) -> dict[str, Any]:
        peer: dict[str, Any] = {"address": self.nodes[index]}
        try:
            data = await self._attempt(
                index,
                "GET",
                "v1/sys/health",
                None,
                token=None,
                what="node health",
                ok_statuses=tuple(_HEALTH_STATES),
                timeout=_PEER_PROBE_SECONDS,
            )
        except (_NodeFailed, BrokerError) as exc:
            peer["state"] = "unreachable"
            peer["error"] = exc.error.detail if isinstance(exc, _NodeFailed) else exc.detail
            return peer
        if not data.get("initialized", False):
            peer["state"] = "uninitialized"
        elif data.get("sealed", True):
            peer["state"] = "sealed"
        else:
            peer["state"] = "standby" if data.get("standby") else "active"
        return peer
