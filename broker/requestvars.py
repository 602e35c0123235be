"""Request-scoped context variables (request id, backend call ids) that follow work into threads,
and the buffer of backend calls the broker makes on its own (outside any request).

Not the encryption context: that is the caller's string map bound to ciphertexts.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

from broker.timeutil import iso, now_utc

# The broker-generated id of the API call being served (never the caller's); sent to
# Vault as X-Request-Id for people reading Vault's log. The merged timeline never joins
# on it alone: anyone holding a Vault token chooses the X-Request-Id they send.
request_id_var: ContextVar[str] = ContextVar("request_id", default="")

# Vault calls made outside any request carry a request id with this prefix. It is a hint for
# humans only: the calls are claimed by the ``background`` audit records that list them.
BACKGROUND_PREFIX = "kb-bg-"

# A call the backend answered without an id of its own (Vault: 204, or an error body) is noted as
# "unnumbered <status> <id the broker sent> <path>" in the id's place (see :func:`unnumbered`).
UNNUMBERED = "unnumbered"


def outgoing_request_id() -> str:
    """The X-Request-Id for a backend call now: the request's own id, or a fresh background one."""
    return request_id_var.get() or f"{BACKGROUND_PREFIX}{uuid.uuid4()}"


def unnumbered(status: int, sent_id: str, path: str) -> str:
    """The call id noted for a call that got no id back: what the broker sent, and the status."""
    return f"{UNNUMBERED} {status} {sent_id} {path}"


def parse_unnumbered(call_id: str) -> tuple[int, str, str] | None:
    """(status, sent id, path) of an :func:`unnumbered` call id; None for an ordinary one."""
    parts = call_id.split(" ", 3)
    if len(parts) != 4 or parts[0] != UNNUMBERED or not parts[1].isdigit():
        return None
    return int(parts[1]), parts[2], parts[3]


# Backend calls made while serving the current request, for the audit record:
# (backend, operation, the backend's own call id). None outside a request.
backend_calls_var: ContextVar[list[tuple[str, str, str]] | None] = ContextVar("backend_calls", default=None)


@dataclass
class _Background:
    """Calls made outside any request since the sink last wrote a ``background`` record."""

    calls: list[tuple[str, str, str]]
    since: str | None = None
    dropped: int = 0


# Bounded: a broker whose log cannot be written keeps only this many; the rest are counted.
MAX_BACKGROUND_CALLS = 4096
# One buffer per event loop (held weakly: a new loop never inherits a finished one's calls, as it
# could by reusing its id), so a sink claims only the calls its own broker made, also when several
# run in one process (tests); plus one for calls from a worker thread outside any loop.
_loop_buffers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Background] = weakref.WeakKeyDictionary()
_thread_buffer: list[_Background] = []
# Told when a call is noted outside requests (the audit sink: write a background record soon, so
# the call does not look unexplained for long). May be called from a worker thread.
_listeners: list[Callable[[], None]] = []


def on_background_call(listener: Callable[[], None]) -> Callable[[], None]:
    """Have ``listener`` called after each call noted outside a request; returns its remover."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener) if listener in _listeners else None


def note_backend_call(backend: str, operation: str, call_id: str) -> None:
    """Remember one backend call: for the current request's record, or for the next background record."""
    calls = backend_calls_var.get()
    if calls is not None:
        calls.append((backend, operation, call_id))
    else:
        _note_outside((backend, operation, call_id))


def _current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _pop_buffer(loop: asyncio.AbstractEventLoop | None) -> _Background | None:
    if loop is None:
        return _thread_buffer.pop() if _thread_buffer else None
    return _loop_buffers.pop(loop, None)


def _buffer() -> _Background:
    """This loop's buffer (or the worker threads' one), created when first needed."""
    loop = _current_loop()
    if loop is None:
        if not _thread_buffer:
            _thread_buffer.append(_Background([]))
        return _thread_buffer[0]
    return _loop_buffers.setdefault(loop, _Background([]))


def clear_background_calls() -> None:
    """Forget every buffered call (for tests that run many brokers' sinks in one process)."""
    _loop_buffers.clear()
    _thread_buffer.clear()


def take_background_calls() -> tuple[list[tuple[str, str, str]], str | None, int]:
    """The calls noted outside requests (in this event loop, or a worker thread) since the last take,
    when the first was noted, and how many were dropped."""
    calls: list[tuple[str, str, str]] = []
    since: str | None = None
    dropped = 0
    for loop in dict.fromkeys((_current_loop(), None)):
        taken = _pop_buffer(loop)
        if taken is None:
            continue
        calls += taken.calls
        dropped += taken.dropped
        if taken.since is not None and (since is None or taken.since < since):
            since = taken.since
    return calls, since, dropped


def restore_background_calls(calls: list[tuple[str, str, str]], since: str | None, dropped: int) -> None:
    """Put back calls whose background record could not be written, so the next one lists them."""
    for call in calls:
        _note_outside(call, notify=False)
    buffer = _buffer()
    buffer.dropped += dropped
    if since is not None and (buffer.since is None or since < buffer.since):
        buffer.since = since


def _note_outside(call: tuple[str, str, str], *, notify: bool = True) -> None:
    buffer = _buffer()
    if buffer.since is None:
        buffer.since = iso(now_utc())
    if len(buffer.calls) >= MAX_BACKGROUND_CALLS:
        buffer.dropped += 1
    else:
        buffer.calls.append(call)
    if notify:
        for listener in list(_listeners):
            listener()
