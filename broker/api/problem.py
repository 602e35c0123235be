"""RFC 9457 problem documents."""

from __future__ import annotations

import json

from aiohttp import web

from broker.errors import BrokerError

PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem_response(error: BrokerError, request_id: str) -> web.Response:
    body = {
        "type": error.type_uri,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "code": error.code,
        "request_id": request_id,
    }
    return web.Response(
        status=error.status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
    )
