"""Prometheus metrics, one registry per application (no process-global state).

Every label value comes from a fixed set: a client chooses the method and the path of
its requests, and a label taken from them verbatim would let it create series (memory
in the broker and in Prometheus) without bound.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Methods the API or HTTP itself defines; anything else a client sends is counted as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"
# Requests that matched no route (404/405), and those refused before routing (malformed HTTP).
UNMATCHED_ROUTE = "unmatched"
UNPARSED_ROUTE = "unparsed"


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


def route_label(request: web.BaseRequest) -> str:
    """The matched route's pattern (a fixed set), never the path the client sent."""
    if not isinstance(request, web.Request):
        return UNPARSED_ROUTE
    resource = request.match_info.route.resource
    return resource.canonical if resource else UNMATCHED_ROUTE


def status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "invalid"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "keybroker_http_requests",
            "API requests by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "keybroker_http_request_duration_seconds",
            "API request latency.",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.component_up = Gauge(
            "keybroker_component_up",
            "1 when the component could serve at the last health check.",
            ["component"],
            registry=self.registry,
        )
        self.connections_open = Gauge(
            "keybroker_connections_open",
            "Client connections open now (after the TLS handshake).",
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "keybroker_connections_closed_by_limit",
            "Client connections the broker closed to enforce a limit, by limit.",
            ["limit"],
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request; ``route`` must be a route pattern or one of the constants above."""
        self.requests.labels(method_label(method), route, status_label(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
