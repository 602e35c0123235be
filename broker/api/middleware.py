"""Middlewares, outermost first: request id, audit record, errors as problem+json, identity,
body bounds. What aiohttp answers itself (malformed HTTP, header timeout) is in broker.api.edge.

Every request gets a request id the broker generates: it names the audit record and
is what the broker sends to Vault, so no caller can choose the id that joins Vault's
audit entries to a record. A caller's well-formed ``X-Request-Id`` is kept as the
record's ``client_request_id`` and echoed back (a malformed one is ignored);
``X-Broker-Request-Id`` carries the broker's own id on every response.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from broker import spans
from broker.api.edge import AUDITED
from broker.api.metrics import method_label, route_label
from broker.api.problem import RequestTimeout, problem_response
from broker.api.revocation import REVOCATIONS, CertificateRevoked
from broker.api.state import (
    AUDIT,
    AUDIT_FACTS,
    AUDIT_HMAC_KEY,
    CLIENT_REQUEST_ID,
    METRICS,
    PRINCIPAL,
    REQUEST_ID,
    SETTINGS,
)
from broker.audit.events import RequestFacts, build_event
from broker.errors import (
    BadRequest,
    BrokerError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
)
from broker.log import get_logger
from broker.policy.model import Principal, principal_from_peercert
from broker.requestvars import backend_calls_var, request_id_var

log = get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID_HEADER = "X-Request-Id"
BROKER_REQUEST_ID_HEADER = "X-Broker-Request-Id"
SPANS = spans.REQUEST_KEY
EPOCH_PATH = "/v1/audit/epoch"
HEALTH_PATH = "/v1/sys/health"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{7,127}$")


def valid_request_id(value: str | None) -> bool:
    return bool(value) and _REQUEST_ID_RE.fullmatch(value or "") is not None


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assign the request id, bind it for logs and backend calls, log one line per request."""
    record = spans.start()
    if record is not None:
        request[SPANS] = record
        began = getattr(request.protocol, "request_began_ns", 0)
        record["parse"] = spans.now() - began if began else 0
    offered = request.headers.get(REQUEST_ID_HEADER)
    client_id = offered if offered is not None and valid_request_id(offered) else None
    request_id = str(uuid.uuid4())
    request[REQUEST_ID] = request_id
    request[CLIENT_REQUEST_ID] = client_id
    token = request_id_var.set(request_id)
    structlog.contextvars.bind_contextvars(request_id=request_id, client_request_id=client_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers[REQUEST_ID_HEADER] = client_id or request_id
        response.headers[BROKER_REQUEST_ID_HEADER] = request_id
        return response
    finally:
        logged = spans.now() if record is not None else 0
        elapsed = time.perf_counter() - started
        route = route_label(request)
        request.app[METRICS].observe(request.method, route, status, elapsed)
        principal = request.get(PRINCIPAL)
        log.info(
            "request",
            method=method_label(request.method),
            route=route,
            status=status,
            latency_ms=round(elapsed * 1000, 3),
            principal=str(principal) if principal else None,
        )
        structlog.contextvars.unbind_contextvars("request_id", "client_request_id")
        request_id_var.reset(token)
        if record is not None:
            record["log"] = spans.now() - logged


@web.middleware
async def audit_trail(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Exactly one durable audit record per request, written before the response leaves.

    Fail closed: when the log cannot be written the request is refused before any
    work is done; when the record of finished work cannot be written, the caller
    gets 503 instead of the answer.
    """
    sink = request.app[AUDIT]
    # Health is the one answer given without a durable record: it reports that very failure.
    reports_health = request.path == HEALTH_PATH
    # Starting a new epoch is the one way out of a log that lost its history, so it must get through.
    starts_epoch = request.path == EPOCH_PATH and sink.awaiting_epoch
    try:
        sink.check_ready()
    except BrokerError as exc:
        if not (reports_health or starts_epoch):
            log.error("request_refused_audit_unavailable", detail=exc.detail)  # noqa: TRY400 - no traceback helps
            return problem_response(exc, request[REQUEST_ID])
    facts = request[AUDIT_FACTS] = RequestFacts()
    calls: list[tuple[str, str, str]] = []
    token = backend_calls_var.set(calls)
    started = time.perf_counter()
    record = request.get(SPANS)
    entered = spans.now() if record is not None else 0
    try:
        response = await handler(request)
    finally:
        backend_calls_var.reset(token)
    handled = spans.now() if record is not None else 0
    principal = request.get(PRINCIPAL)
    event = build_event(
        request_id=request[REQUEST_ID],
        client_request_id=request.get(CLIENT_REQUEST_ID),
        principal=str(principal) if principal else None,
        method=method_label(request.method),
        route=route_label(request),
        status=response.status,
        latency_ms=(time.perf_counter() - started) * 1000,
        facts=facts,
        calls=calls,
        hmac_key=request.app[AUDIT_HMAC_KEY],
    )
    if record is not None:
        appending = spans.now()
        # Everything inside (identity, body, policy, key cache, backend); the parts are split below.
        record["inner"] = handled - entered
        record["audit_build"] = appending - handled
    try:
        await sink.append(event)
        if record is not None:
            record["audit_append"] = spans.now() - appending
            record["audit_write_fsync"] = spans.STATE.last_write_ns
    except BrokerError as exc:
        if reports_health:
            return response
        return problem_response(
            type(exc)(f"{exc.detail}; the operation's answer is withheld because it could not be recorded"),
            request[REQUEST_ID],
        )
    request[AUDITED] = True
    return response


@web.middleware
async def problem_details(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as application/problem+json; never show a traceback."""
    allow = ""
    try:
        return await handler(request)
    except BrokerError as exc:
        if exc.status >= 500:
            log.warning("request_failed", code=exc.code, detail=exc.detail)
        error = exc
    except BodyTimeout:
        error = RequestTimeout("the request body was not complete in time")
    except web.HTTPRequestEntityTooLarge:
        error = PayloadTooLarge("request body is too large")
    except web.HTTPNotFound:
        # The path and method are the client's: never echoed into answers, logs or records.
        error = NotFound("no such endpoint")
    except web.HTTPMethodNotAllowed as exc:
        allow = ", ".join(sorted(exc.allowed_methods))
        error = MethodNotAllowed(f"method not allowed here (allowed: {allow})")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = BadRequest(exc.reason)
    except Exception:
        log.exception("unhandled_error")
        error = BrokerError("internal error; see the broker log")
    facts = request.get(AUDIT_FACTS)
    if facts is not None:
        facts.error = (error.code, error.detail)
    response = problem_response(error, request[REQUEST_ID])
    if allow:
        response.headers["Allow"] = allow
    if isinstance(error, RequestTimeout):
        # The rest of a stalled body may never come: do not wait for it on this connection.
        response.force_close()
    return response


class BodyTimeout(TimeoutError):
    """Raised by a body read past server.body_timeout_seconds; answered 408.

    A TimeoutError so that aiohttp, draining the unread rest of the body after the
    answer, stops quietly at it instead of logging an unhandled exception.
    """


@web.middleware
async def bounded_body(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bound the request body: server.max_body_bytes at once when declared, body_timeout_seconds to arrive.

    A client that declares a body and sends it slowly (or never) would otherwise hold a
    handler, its connection and its buffers for as long as it likes. The handler reads the
    body as usual; if it has not all arrived in time, that read raises BodyTimeout (408).
    """
    server = request.app[SETTINGS].server
    declared = request.content_length
    if declared is not None and declared > server.max_body_bytes:
        raise PayloadTooLarge(f"request body is too large (at most {server.max_body_bytes} bytes)")
    stream = request.content
    if not request.body_exists or stream.is_eof():
        return await handler(request)

    def expire() -> None:
        if not stream.is_eof():
            stream.set_exception(BodyTimeout())

    timer = asyncio.get_running_loop().call_later(server.body_timeout_seconds, expire)
    stream.on_eof(timer.cancel)
    try:
        return await handler(request)
    finally:
        timer.cancel()


def cert_der(ssl_object: Any) -> bytes:
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    return der if isinstance(der, bytes) else b""


# Where a connection keeps what its verified certificate says (EdgeHandler.peer_identity).
_Peer = tuple[Any, bytes, Principal]


def _peer(request: web.Request, ssl_object: Any) -> tuple[bytes, Principal]:
    """The peer certificate's DER and its principal, read once per connection.

    The certificate of a TLS connection cannot change after its handshake (the broker's TLS
    context sets OP_NO_RENEGOTIATION, and TLS 1.3 has none), so parsing it again for every
    request on a keep-alive connection only costs time. Cached on the connection's protocol
    object, keyed by the very SSL object, so a reused protocol never serves another peer's.
    Revocation is still checked on every request (the CRL changes; the certificate does not).
    """
    protocol = request.protocol
    cached: _Peer | None = getattr(protocol, "peer_identity", None)
    if cached is not None and ssl_object is not None and cached[0] is ssl_object:
        return cached[1], cached[2]
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        raise Unauthenticated("no verified client certificate on this connection")
    principal = principal_from_peercert(cert, request.app[SETTINGS].server.trust_domain)
    der = cert_der(ssl_object)
    if hasattr(protocol, "peer_identity"):
        protocol.peer_identity = (ssl_object, der, principal)
    return der, principal


@web.middleware
async def identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read the principal once from the verified client certificate; refuse a revoked one.

    The handshake proved the certificate chains to the client CA; whether that CA revoked it
    since is told by its CRL (broker.api.revocation): 401 ``certificate_revoked``, or 503
    ``crl_unavailable`` while no current CRL is held (fail closed).
    """
    checking = spans.now() if spans.STATE.on else 0
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der, principal = _peer(request, ssl_object)
    # Recorded even when refused below: the audit record names whose certificate was presented.
    request[PRINCIPAL] = principal
    structlog.contextvars.bind_contextvars(principal=principal.id)
    try:
        revocations = request.app.get(REVOCATIONS)
        if revocations is not None:
            try:
                revocations.check(der)
            except CertificateRevoked:
                log.warning("revoked_certificate_presented", principal=principal.id)
                raise
        if checking:
            spans.add("identity", spans.now() - checking)
        return await handler(request)
    finally:
        structlog.contextvars.unbind_contextvars("principal")
