"""RFC 9457 problem documents."""

from __future__ import annotations

import json

from aiohttp import web

from broker.errors import BrokerError, ClientError

PROBLEM_CONTENT_TYPE = "application/problem+json"


class RequestTimeout(ClientError):
    """The client did not send its request header or body within the server's timeout (408)."""

    status = 408
    code = "request_timeout"
    title = "Request timeout"


def problem_body(error: BrokerError, request_id: str) -> bytes:
    body = {
        "type": error.type_uri,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "code": error.code,
        "request_id": request_id,
    }
    return json.dumps(body).encode()


def problem_response(error: BrokerError, request_id: str) -> web.Response:
    response = web.Response(
        status=error.status,
        body=problem_body(error, request_id),
        content_type=PROBLEM_CONTENT_TYPE,
    )
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response
