"""Prometheus labels come from fixed sets whatever methods and paths clients send."""

from __future__ import annotations

import asyncio
import random
import string

from aiohttp import web
from aiohttp.test_utils import TestServer

from broker.api.metrics import KNOWN_METHODS, Metrics, method_label, status_label
from broker.api.middleware import problem_details, request_context
from broker.api.state import METRICS

_EXOTIC_METHODS = [
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "SEARCH",
    "REPORT",
    "PURGE",
    "LINK",
    "UNLINK",
    "ACL",
    "BIND",
    "REBIND",
    "UNBIND",
    "MKCALENDAR",
    "SUBSCRIBE",
    "NOTIFY",
    "QUERY",
]


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _series(metrics: Metrics) -> set[tuple[tuple[str, str], ...]]:
    out: set[tuple[tuple[str, str], ...]] = set()
    for family in metrics.registry.collect():
        for sample in family.samples:
            out.add((("name", sample.name), *sorted(sample.labels.items())))
    return out


def test_a_thousand_random_methods_and_paths_make_a_bounded_number_of_series() -> None:
    """1,000 requests with random methods and paths, through the real middleware, add few series."""
    rng = random.Random(11)

    async def scenario() -> Metrics:
        app = web.Application(middlewares=[request_context, problem_details])
        app[METRICS] = Metrics()
        app.router.add_get("/v1/keys/{name}", _ok)
        app.router.add_post("/v1/keys/{name}/encrypt", _ok)
        async with TestServer(app) as server:
            for i in range(1000):
                method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))
                if i % 3 == 0:
                    method = rng.choice(sorted(KNOWN_METHODS))
                elif i % 3 == 1:
                    # Methods aiohttp's C parser (llhttp) accepts; its pure-Python parser takes any token.
                    method = rng.choice(_EXOTIC_METHODS)
                tail = "".join(rng.choices(string.ascii_lowercase + string.digits, k=12))
                path = rng.choice([f"/v1/keys/{tail}", f"/v1/keys/{tail}/encrypt", f"/{tail}/{tail}"])
                reader, writer = await asyncio.open_connection(server.host, server.port)
                writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                answer = await asyncio.wait_for(reader.read(), 5)
                assert answer.startswith(b"HTTP/1.")
                writer.close()
                await writer.wait_closed()
        return app[METRICS]

    metrics = asyncio.run(scenario())
    series = _series(metrics)
    methods = {dict(s).get("method") for s in series} - {None}
    routes = {dict(s).get("route") for s in series} - {None}
    assert methods <= KNOWN_METHODS | {"other"}
    assert "other" in methods
    assert routes <= {"/v1/keys/{name}", "/v1/keys/{name}/encrypt", "unmatched"}
    # Counters and histogram buckets for at most 8 methods x 3 routes x a few statuses.
    assert len(series) < 400


def test_label_helpers_map_everything_unknown_to_one_value() -> None:
    """Unknown methods become "other"; statuses outside HTTP's range become "invalid"."""
    assert method_label("GET") == "GET"
    assert method_label("get") == "other"
    assert method_label("X" * 5000) == "other"
    assert (status_label(200), status_label(99), status_label(1000)) == ("200", "invalid", "invalid")
