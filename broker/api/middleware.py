"""Middlewares, outermost first: request id, errors as problem+json, identity.

The request id is accepted from the caller's ``X-Request-Id`` only when it is
well-formed (so a hostile value cannot be smuggled into logs or into Vault's
audit log), otherwise a fresh one is generated; it is echoed on every response.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from broker.api.keys import METRICS, PRINCIPAL, REQUEST_ID, SETTINGS
from broker.api.problem import problem_response
from broker.context import request_id_var
from broker.errors import (
    BadRequest,
    BrokerError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
)
from broker.log import get_logger
from broker.policy.model import principal_from_peercert

log = get_logger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{7,127}$")


def valid_request_id(value: str | None) -> bool:
    return bool(value) and _REQUEST_ID_RE.fullmatch(value or "") is not None


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assign the request id, bind it for logs and backend calls, log one line per request."""
    offered = request.headers.get(REQUEST_ID_HEADER)
    request_id = offered if offered is not None and valid_request_id(offered) else str(uuid.uuid4())
    request[REQUEST_ID] = request_id
    token = request_id_var.set(request_id)
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
    finally:
        elapsed = time.perf_counter() - started
        route = (
            request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        )
        request.app[METRICS].observe(request.method, route, status, elapsed)
        principal = request.get(PRINCIPAL)
        log.info(
            "request",
            method=request.method,
            route=route,
            status=status,
            latency_ms=round(elapsed * 1000, 3),
            principal=str(principal) if principal else None,
        )
        structlog.contextvars.unbind_contextvars("request_id")
        request_id_var.reset(token)


@web.middleware
async def problem_details(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as application/problem+json; never show a traceback."""
    try:
        return await handler(request)
    except BrokerError as exc:
        if exc.status >= 500:
            log.warning("request_failed", code=exc.code, detail=exc.detail)
        return problem_response(exc, request[REQUEST_ID])
    except web.HTTPRequestEntityTooLarge:
        return problem_response(PayloadTooLarge("request body is too large"), request[REQUEST_ID])
    except web.HTTPNotFound:
        return problem_response(NotFound(f"no such endpoint: {request.path}"), request[REQUEST_ID])
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        resp = problem_response(
            MethodNotAllowed(f"{request.method} is not allowed here (allowed: {allowed})"),
            request[REQUEST_ID],
        )
        resp.headers["Allow"] = allowed
        return resp
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = BadRequest(exc.reason)
        return problem_response(error, request[REQUEST_ID])
    except Exception:
        log.exception("unhandled_error")
        return problem_response(BrokerError("internal error; see the broker log"), request[REQUEST_ID])


@web.middleware
async def identity(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read the principal once from the verified client certificate."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        raise Unauthenticated("no verified client certificate on this connection")
    principal = principal_from_peercert(cert, request.app[SETTINGS].server.trust_domain)
    request[PRINCIPAL] = principal
    structlog.contextvars.bind_contextvars(principal=principal.id)
    try:
        return await handler(request)
    finally:
        structlog.contextvars.unbind_contextvars("principal")
