"""The transport edge: per-connection limits, and problem+json with an audit record for the
answers aiohttp gives itself.

aiohttp's HTTP parser refuses malformed requests (an over-long line, too many headers, a bad
method, a bad Content-Length or chunk size...) inside its connection protocol, before any
application code runs: ``RequestHandler.handle_error`` answers text/plain and no middleware
sees it. :class:`EdgeHandler` overrides that method, so such a refusal (and any error that
escapes the middlewares) is answered like every other one: RFC 9457 problem+json with a
request id, and exactly one audit record naming the principal of the verified client
certificate. It also closes a connection whose request header is not complete in time (408)
and counts connections against ``server.max_connections``.

aiohttp internals relied on (aiohttp pinned to one minor in pyproject.toml; the unit test
``tests/unit/test_edge_hook.py`` fails if any of them changes): ``handle_error`` is what the
parser-error path calls; ``_ErrInfo``, ``_messages``, ``_waiter`` and ``_request_in_progress``
time the header and queue the 408.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import resource
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, http_exceptions, web
from aiohttp.http import HttpVersion10, RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from multidict import CIMultiDict, CIMultiDictProxy

from broker import spans
from broker.api.idempotency import refuse_unkept_key
from broker.api.metrics import UNPARSED_ROUTE, method_label, route_label
from broker.api.problem import PROBLEM_CONTENT_TYPE, RequestTimeout, problem_body, problem_response
from broker.api.state import (
    AUDIT,
    AUDIT_FACTS,
    AUDIT_HMAC_KEY,
    CLIENT_REQUEST_ID,
    METRICS,
    PRINCIPAL,
    REQUEST_ID,
)
from broker.audit.events import RequestFacts, build_event
from broker.config.model import ServerConfig
from broker.errors import BackendTimeout, BadRequest, BrokerError, ClientError, ConfigError, PayloadTooLarge
from broker.log import get_logger
from broker.policy.model import principal_from_peercert

log = get_logger(__name__)

# Set by the audit middleware once a request's record is on disk; an error answered here
# for a request without it gets its record here.
AUDITED = "keybroker.audited"

# Fixed texts per parser refusal: aiohttp's own messages quote the client's bytes, which must
# reach neither the answer nor the log nor the audit record. Most specific class first.
_PARSER_REFUSALS: tuple[tuple[type[BaseException], str], ...] = (
    (http_exceptions.BadHttpMethod, "invalid request method"),
    (http_exceptions.LineTooLong, "request line or a header line is too long"),
    (http_exceptions.InvalidHeader, "invalid header"),
    (http_exceptions.InvalidURLError, "invalid request target"),
    (http_exceptions.BadStatusLine, "malformed request line"),
    (http_exceptions.ContentLengthError, "invalid Content-Length or body length"),
    (http_exceptions.TransferEncodingError, "invalid Transfer-Encoding or chunk"),
    (http_exceptions.ContentEncodingError, "invalid Content-Encoding"),
    (http_exceptions.BadHttpMessage, "malformed HTTP request"),
)


_LINGER_SECONDS = 2.0

# asyncio gives every TLS connection a 256 KiB read buffer, allocated and zeroed up front: with
# 700 connections held open that alone was ~180 MB of the broker's RSS (and glibc kept it after
# they closed). A TLS record carries at most 16 KiB, so 32 KiB reads lose nothing.
TLS_READ_BUFFER_BYTES = 32 * 1024


def bound_tls_read_buffer() -> None:
    """Shrink asyncio's per-connection TLS read buffer (process-wide: server and client sides)."""
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER_BYTES


# Past a handshake cap, a handshake in progress this long yields to a newcomer: a client that
# completes its handshake takes milliseconds, one that has not in a second is likely stalled.
HANDSHAKE_GRACE_SECONDS = 1.0


class HeaderTimeout(Exception):
    """A request's header was not complete within server.header_timeout_seconds."""


class Edge:
    """One listening socket's shared state: the application, the limits, the open connections.

    A connection is counted from accept, before its TLS handshake: a handshake costs a file
    descriptor and buffers whether or not it ever completes. Handshakes in progress are also
    tracked in accept order, in all and per peer address: past a cap the oldest one is dropped
    to make way for the newcomer once it has had HANDSHAKE_GRACE_SECONDS (stalled, not slow),
    else the newcomer is refused. Either way a peer holds at most its cap of descriptors.
    """

    def __init__(self, app: web.Application, server: web.Server, config: ServerConfig) -> None:
        self.app = app
        self.server = server
        self.config = config
        self.open = 0
        # Insertion-ordered (oldest first): every handshake in progress, and per peer address.
        self._handshaking: dict[TlsConnection, None] = {}
        self._by_peer: dict[str, dict[TlsConnection, None]] = {}

    @property
    def handshaking(self) -> int:
        return len(self._handshaking)

    def __call__(self) -> EdgeHandler:
        """One aiohttp handler per accepted connection (the protocol factory of a plain listener)."""
        c = self.config
        return EdgeHandler(
            self,
            self.server,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=c.idle_timeout_seconds,
            max_line_size=c.max_request_line_bytes,
            max_field_size=c.max_header_bytes,
            max_headers=c.max_headers,
            # No access log (the broker logs one line per request itself); no request-body
            # decompression: nothing needs it, and a small gzip body can inflate without bound.
            access_log=None,
            auto_decompress=False,
            # After an answer sent before the body was read (413, 408), drain the rest this long
            # (so the client can read the answer) instead of aiohttp's 10 s.
            lingering_time=_LINGER_SECONDS,
        )

    def admit(self) -> bool:
        # At the cap, a stalled handshake yields its place before a new connection is refused.
        if self.open >= self.config.max_connections and not self._evict_stale(self._handshaking):
            self.app[METRICS].connections_closed.labels("max_connections").inc()
            return False
        self.open += 1
        self.app[METRICS].connections_open.set(self.open)
        return True

    def admit_handshake(self, conn: TlsConnection) -> bool:
        """Count a TLS handshake in progress, making way past a cap; False: refuse this one."""
        peer = self._by_peer.get(conn.peer, {})
        if len(peer) >= self.config.max_handshakes_per_peer and not self._evict_stale(peer):
            self.app[METRICS].connections_closed.labels("max_handshakes").inc()
            return False
        cap = min(self.config.max_handshakes, self.config.max_connections)
        if len(self._handshaking) >= cap and not self._evict_stale(self._handshaking):
            self.app[METRICS].connections_closed.labels("max_handshakes").inc()
            return False
        self._handshaking[conn] = None
        self._by_peer.setdefault(conn.peer, {})[conn] = None
        return True

    def release(self) -> None:
        self.open -= 1
        self.app[METRICS].connections_open.set(self.open)

    def handshake_ended(self, conn: TlsConnection) -> None:
        self._handshaking.pop(conn, None)
        peer = self._by_peer.get(conn.peer)
        if peer is not None:
            peer.pop(conn, None)
            if not peer:
                del self._by_peer[conn.peer]

    def _evict_stale(self, among: dict[TlsConnection, None]) -> bool:
        """Drop the oldest handshake of ``among`` if it has had its grace; False if none has."""
        oldest = next(iter(among), None)
        if oldest is None or time.monotonic() - oldest.started < HANDSHAKE_GRACE_SECONDS:
            # Young handshakes are a burst of clients, not stalled ones: refuse the newcomer instead.
            return False
        self.handshake_ended(oldest)
        self.app[METRICS].connections_closed.labels("max_handshakes").inc()
        oldest.drop()
        return True

    async def record(
        self, request: web.BaseRequest, error: BrokerError, request_id: str, started: float
    ) -> None:
        """Write the audit record of an answer given here; raises BrokerError if it cannot."""
        sink = self.app[AUDIT]
        known = request.get(PRINCIPAL)
        principal = str(known) if known else _peer_principal(request, self.config.trust_domain)
        # A request the parser refused never reached the middlewares, which count the others.
        unparsed = request.get(REQUEST_ID) is None
        route = UNPARSED_ROUTE if unparsed else route_label(request)
        method = method_label(request.method)
        elapsed = time.perf_counter() - started
        if unparsed:
            self.app[METRICS].observe(method, route, error.status, elapsed)
        event = build_event(
            request_id=request_id,
            principal=principal,
            method=method,
            route=route,
            status=error.status,
            latency_ms=elapsed * 1000,
            facts=RequestFacts(error=(error.code, error.detail)),
            calls=[],
            hmac_key=self.app[AUDIT_HMAC_KEY],
        )
        sink.check_ready()
        await sink.append(event)


class EdgeHandler(RequestHandler):
    """aiohttp's connection protocol with the broker's limits and error answers."""

    def __init__(self, edge: Edge, server: web.Server, *, counted: bool = False, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._edge = edge
        # Over TLS the connection was counted at accept (TlsConnection); a plain one is counted here.
        self._counted = counted
        self._admitted = False
        self._header_timer: asyncio.TimerHandle | None = None
        # When the current request's first bytes arrived (only while spans are recorded).
        self.request_began_ns = 0
        # (ssl object, certificate DER, principal) of this connection's verified peer,
        # filled by the identity middleware on the first request.
        self.peer_identity: Any = None
        if self._request_factory is not None:
            self._request_factory = _protocol_checked(self._request_factory)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._counted:
            return
        self._admitted = self._edge.admit()
        if not self._admitted:
            # Reading a request to answer it would spend what the cap protects; close unanswered.
            log.warning("connection_refused", reason="server.max_connections reached", open=self._edge.open)
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        if self._admitted:
            self._admitted = False
            self._edge.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Bytes that arrive while a request is being served are its body (bounded by the body
        # timeout) or a pipelined next request (bounded by the idle timeout once this one ends).
        starts_request = not self._request_in_progress and not self._messages
        if starts_request and spans.STATE.on:
            self.request_began_ns = spans.now()
        super().data_received(data)
        if self._messages or self._force_close or self._close:
            # A whole request header arrived (or the connection is ending): stop the clock.
            self._cancel_header_timer()
        elif data and starts_request and self._header_timer is None:
            self._header_timer = self._loop.call_later(
                self._edge.config.header_timeout_seconds, self._header_timed_out
            )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self._messages:
            # A request is being served (these bytes were its body, or the next request
            # pipelined behind it): the idle timeout bounds the next header once it is done.
            return
        self._edge.app[METRICS].connections_closed.labels("header_timeout").inc()
        # Answered through the same path as a parser refusal (handle_error below): 408, then close.
        self._messages.append((_ErrInfo(status=408, exc=HeaderTimeout(), message=""), EMPTY_PAYLOAD))
        self._close = True
        waiter.set_result(None)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        record: dict[str, int] | None = request.get(spans.REQUEST_KEY)
        if record is None:
            return await super().finish_response(request, resp, start_time)
        writing = spans.now()
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            record["respond"] = spans.now() - writing
            spans.emit(record)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Every answer aiohttp makes itself: problem+json, a request id, one audit record."""
        del message  # aiohttp's text quotes the client's bytes
        if request.writer.output_size > 0:
            # Part of an answer is already on the wire: nothing can be sent, as aiohttp does.
            raise ConnectionError("an answer was already partly sent; closing the connection")
        error = _error_for(status, exc)
        if error.status >= 500:
            log.error("unhandled_error", exc_info=exc)
        else:
            log.info("request_refused", status=error.status, code=error.code, detail=error.detail)
        request_id = request.get(REQUEST_ID) or str(uuid.uuid4())
        needs_record = not request.get(AUDITED)
        return _EdgeAnswer(self._edge, request, error, request_id, needs_record=needs_record)


class _EdgeAnswer(web.Response):
    """A problem answer whose audit record is written before it is sent (fail closed: 503 if not)."""

    def __init__(
        self, edge: Edge, request: web.BaseRequest, error: BrokerError, request_id: str, *, needs_record: bool
    ) -> None:
        super().__init__(
            status=error.status, body=problem_body(error, request_id), content_type=PROBLEM_CONTENT_TYPE
        )
        # As on every answer: the caller's own id echoed (when it sent a valid one), the broker's beside it.
        self.headers["X-Request-Id"] = request.get(CLIENT_REQUEST_ID) or request_id
        self.headers["X-Broker-Request-Id"] = request_id
        self._retry_after(error)
        self.force_close()
        self._edge = edge
        self._error = error
        self._request_id = request_id
        self._needs_record = needs_record
        self._started = time.perf_counter()

    async def prepare(self, request: web.BaseRequest) -> Any:
        if self._needs_record and not self.prepared:
            self._needs_record = False
            try:
                await self._edge.record(request, self._error, self._request_id, self._started)
            except BrokerError as exc:
                log.error("request_refused_audit_unavailable", detail=exc.detail)  # noqa: TRY400 - no traceback helps
                withheld = type(exc)(f"{exc.detail}; the answer is withheld because it could not be recorded")
                self.set_status(withheld.status)
                self.body = problem_body(withheld, self._request_id)
                self._retry_after(withheld)
        return await super().prepare(request)

    def _retry_after(self, error: BrokerError) -> None:
        # As problem_response does: a refusal worth retrying says when, from the edge too.
        if error.retry_after is not None:
            self.headers["Retry-After"] = str(error.retry_after)


class EdgeSite(web.BaseSite):
    """A TLS listener whose connections are :class:`EdgeHandler` and whose handshakes are bounded."""

    def __init__(
        self, runner: web.AppRunner, config: ServerConfig, ssl_context: Any, *, reuse_port: bool = False
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=1024)
        # serve --workers: every worker listens on the port; the kernel spreads connections.
        self._reuse_port = reuse_port
        server = runner.server
        if server is None:  # BaseSite already refuses this; kept for the type
            raise RuntimeError("call runner.setup() before making a site")
        self.edge = Edge(runner.app, server, config)
        self._config = config

    @property
    def name(self) -> str:
        return f"https://{self._config.host}:{self._config.port}"

    async def start(self) -> None:
        await super().start()
        # TLS is layered here, not by create_server(ssl=...): asyncio would call the protocol
        # only after the handshake, too late to count and cap connections still handshaking.
        ctx = self._ssl_context
        factory: Callable[[], asyncio.BaseProtocol] = self.edge if ctx is None else self._tls_connection
        self._server = await asyncio.get_running_loop().create_server(
            factory,
            self._config.host,
            self._config.port,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )

    def _tls_connection(self) -> TlsConnection:
        handler = self.edge()
        handler._counted = True
        return TlsConnection(
            self.edge, handler, self._ssl_context, self._config.tls_handshake_timeout_seconds
        )


class TlsConnection(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS layer over one accepted TCP connection, counted from accept on.

    Relies on asyncio.sslproto.SSLProtocol (CPython 3.11): its constructor, connection_made
    (starts the handshake), _on_handshake_complete and connection_lost; tests/unit/test_edge_hook.py
    checks they are there.
    """

    def __init__(self, edge: Edge, handler: EdgeHandler, ctx: Any, handshake_timeout: float) -> None:
        super().__init__(
            asyncio.get_running_loop(),
            handler,
            ctx,
            None,  # type: ignore[arg-type]  # no waiter: nothing awaits the handshake but this protocol
            server_side=True,
            ssl_handshake_timeout=handshake_timeout,  # type: ignore[arg-type]  # typeshed says int; asyncio takes seconds
        )
        self._edge = edge
        self._raw: asyncio.Transport | None = None
        self._counted = False
        self.peer = ""
        self.started = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):
            raise TypeError("a TLS connection needs a stream transport")
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if peername else ""
        if not self._edge.admit():
            log.warning("connection_refused", reason="server.max_connections reached", open=self._edge.open)
            transport.abort()
            return
        if not self._edge.admit_handshake(self):
            self._edge.release()
            log.warning("connection_refused", reason="server.max_handshakes reached", peer=self.peer)
            transport.abort()
            return
        self._counted = True
        self._raw = transport
        super().connection_made(transport)

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        self._edge.handshake_ended(self)
        super()._on_handshake_complete(handshake_exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._counted:
            return  # refused at accept: the TLS layer never started
        self._counted = False
        self._edge.handshake_ended(self)
        self._edge.release()
        super().connection_lost(exc)

    def drop(self) -> None:
        """Close a handshake in progress at once (made way for a newer one)."""
        if self._raw is not None:
            self._raw.abort()


# Files the broker needs besides client connections: backend sockets (Vault, KMS), the HSM
# library, audit files, logs, the interpreter's own.
FD_HEADROOM = 256


def raise_open_file_limit(config: ServerConfig) -> int:
    """Raise the soft open-file limit to the hard one; refuse to start if max_connections cannot fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("open_file_limit_not_raised", soft=soft, hard=hard, error=str(exc))
    if soft != resource.RLIM_INFINITY and config.max_connections + FD_HEADROOM > soft:
        raise ConfigError(
            f"{config.max_connections} connections plus {FD_HEADROOM} files for the broker's own use exceed "
            f"the open-file limit ({soft}); raise it (systemd: LimitNOFILE=) or lower server.max_connections",
            key="server.max_connections",
        )
    return int(soft)


class ExpectationFailed(ClientError):
    status = 417
    code = "expectation_failed"
    title = "Expectation failed"


# Request storage set by the request factory (EdgeHandler): the Expect header aiohttp never
# sees (so it sends no 100 Continue and runs no expect handler), and a request line with no version.
EXPECTATION = "keybroker.expectation"
NO_HTTP_VERSION = "keybroker.no_http_version"

_RequestFactory = Callable[..., web.BaseRequest]


def _protocol_checked(factory: _RequestFactory) -> _RequestFactory:
    """Wrap aiohttp's request factory: take Expect out of the request and note a missing version.

    aiohttp answers Expect itself (100 Continue, or 417 text/plain) in Application._handle before
    any middleware, and answers a versionless request line as HTTP/0.9. Both are decided by the
    ``protocol_checks`` middleware instead, after identity, with a record like every answer.
    """

    def make(message: Any, *args: Any) -> web.BaseRequest:
        expectation: str | None = None
        no_version = False
        if isinstance(message, RawRequestMessage):
            if hdrs.EXPECT in message.headers:
                expectation = ",".join(message.headers.getall(hdrs.EXPECT))
                kept = CIMultiDict((k, v) for k, v in message.headers.items() if k.lower() != "expect")
                message = message._replace(
                    headers=CIMultiDictProxy(kept),
                    raw_headers=tuple((k, v) for k, v in message.raw_headers if k.lower() != b"expect"),
                )
            if message.version < HttpVersion10:
                no_version = True
                message = message._replace(version=HttpVersion10, should_close=True)
        request = factory(message, *args)
        if expectation is not None:
            request[EXPECTATION] = expectation
        if no_version:
            request[NO_HTTP_VERSION] = True
        return request

    return make


@web.middleware
async def protocol_checks(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse what HTTP/1.1 allows but the broker does not: answered problem+json, recorded, closed.

    No 100 Continue is ever sent: the body is read (if at all) once the handler decided to, and a
    client waiting for 100 sends it after its own short wait (RFC 9110 section 10.1.1).
    """
    error: BrokerError | None = None
    if request.get(NO_HTTP_VERSION):
        error = BadRequest("the request line names no HTTP version (HTTP/1.1 is required)")
    else:
        codings = [
            c.strip().lower()
            for v in request.headers.getall(hdrs.TRANSFER_ENCODING, ())
            for c in v.split(",")
        ]
        if codings and codings != ["chunked"]:
            error = BadRequest("only the chunked transfer-coding is accepted")
        expectation = request.get(EXPECTATION)
        if error is None and expectation is not None and expectation.strip().lower() != "100-continue":
            error = ExpectationFailed("only 'Expect: 100-continue' is understood")
    if error is None:
        # One meaning per query: a proxy and the broker must not read different values of a
        # repeated parameter (the handlers read the first). Framing is fine, so no close.
        query = request.query
        if len(query) != len(set(query)):
            raise BadRequest("a query parameter is given more than once")
        refuse_unkept_key(request)
        return await handler(request)
    log.info("request_refused", status=error.status, code=error.code, detail=error.detail)
    facts = request.get(AUDIT_FACTS)
    if facts is not None:
        facts.error = (error.code, error.detail)
    response = problem_response(error, request[REQUEST_ID])
    # The body's framing (or whether one follows) is in doubt: never read another request here.
    response.force_close()
    return response


def _error_for(status: int, exc: BaseException | None) -> BrokerError:
    if isinstance(exc, HeaderTimeout):
        return RequestTimeout("the request header was not complete in time")
    if status == 413:
        return PayloadTooLarge("request body is too large")
    if status == 504:
        return BackendTimeout("the request took too long")
    if status >= 500 or exc is None:
        return BrokerError("internal error; see the broker log")
    detail = next(
        (text for kind, text in _PARSER_REFUSALS if isinstance(exc, kind)), "malformed HTTP request"
    )
    return BadRequest(detail)


def _peer_principal(request: web.BaseRequest, trust_domain: str) -> str | None:
    """The verified client certificate's principal, when the handshake gave one that names one."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    try:
        return str(principal_from_peercert(cert, trust_domain))
    except BrokerError:
        return None
