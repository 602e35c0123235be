"""Route table of API v1 and the system endpoints."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from broker.api.authz import authorize
from broker.api.state import AUDIT, HSM, KMS, METRICS, POLICIES, SETTINGS, VAULT, WORKER
from broker.errors import BrokerError

# A health check must answer quickly even when a backend hangs.
HEALTH_DEADLINE = 4.0


async def _check(name: str, probe: Callable[[], Awaitable[dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    try:
        async with asyncio.timeout(HEALTH_DEADLINE):
            return name, await probe()
    except BrokerError as exc:
        return name, {"ok": False, "error": exc.detail}
    except TimeoutError:
        return name, {"ok": False, "error": f"no answer within {HEALTH_DEADLINE:g}s"}


async def health(request: web.Request) -> web.Response:
    """GET /v1/sys/health: 200 only when Vault, KMS, the HSM, the audit sink and the policy can serve."""
    await authorize(request, "sys.health")
    app = request.app

    async def audit() -> dict[str, Any]:
        return app[AUDIT].status()

    results = dict(
        await asyncio.gather(
            _check("vault", app[VAULT].health),
            _check("kms", app[KMS].health),
            _check("hsm", app[HSM].health),
            _check("audit", audit),
            _check("policy", app[POLICIES].health),
        )
    )
    healthy = all(part["ok"] for part in results.values())
    for name, part in results.items():
        app[METRICS].component_up.labels(name).set(1 if part["ok"] else 0)
    # Which replica answered (its audit node name: behind a load balancer the caller cannot tell),
    # and which process (with serve --workers, each worker has its own index, pid and chain).
    index, count = app.get(WORKER, (None, 1))
    worker = {"index": index, "count": count, "pid": os.getpid(), "node": app[AUDIT].node}
    replica = app[SETTINGS].audit.node
    body = {"status": "ok" if healthy else "unavailable", "replica": replica, **results, "worker": worker}
    return web.json_response(body, status=200 if healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    """GET /v1/metrics (and /metrics): Prometheus text exposition."""
    await authorize(request, "sys.metrics")
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/sys/health", health)
    app.router.add_get("/v1/metrics", metrics)
    app.router.add_get("/metrics", metrics)
