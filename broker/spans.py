"""Where one request's time goes: per-stage spans for profiling (bench/), off unless asked for.

With ``KEYBROKER_SPANS_FILE`` set, ``SIGUSR1`` switches recording on and off; while on,
every request appends one JSON line of stage durations (nanoseconds) to that file:
HTTP parsing up to the middlewares, identity, the handler's own work (body, JSON, policy,
key cache), the backend round trip, building the audit record, its hand-off, write and
fsync, the log line, and writing the response. Without the variable (the default), or
while off, a request pays one attribute check per stage and nothing is written.

The lines hold durations and the route's stage names only: no ids, keys or values.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from typing import IO

ENV = "KEYBROKER_SPANS_FILE"
# Where a request keeps its stage durations (aiohttp request mapping key).
REQUEST_KEY = "keybroker.spans"


class _State:
    on = False
    out: IO[str] | None = None
    last_write_ns = 0  # the audit writer's latest write + fsync, for the request it carried


STATE = _State()
_current: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar("kb_spans", default=None)


def available() -> bool:
    return bool(os.environ.get(ENV))


def toggle() -> None:
    """Switch recording on (opening the file for append) or off (flushing and closing it)."""
    if STATE.on:
        STATE.on = False
        if STATE.out is not None:
            STATE.out.close()
            STATE.out = None
        return
    path = os.environ.get(ENV)
    if not path:
        return
    STATE.out = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open while recording
    STATE.on = True


def start() -> dict[str, int] | None:
    """A new span record for this request (None while off), bound to the request's context."""
    if not STATE.on:
        return None
    record: dict[str, int] = {}
    _current.set(record)
    return record


def add(stage: str, nanoseconds: int) -> None:
    """Add time spent in ``stage`` to the current request's record (no-op while off)."""
    if STATE.on:
        record = _current.get()
        if record is not None:
            record[stage] = record.get(stage, 0) + nanoseconds


def now() -> int:
    return time.perf_counter_ns()


def emit(record: dict[str, int]) -> None:
    if STATE.on and STATE.out is not None:
        STATE.out.write(json.dumps(record, separators=(",", ":")) + "\n")
