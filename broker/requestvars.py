"""Request-scoped context variables (request id, backend call ids) that follow work into threads.

Not the encryption context: that is the caller's string map bound to ciphertexts.
"""

from __future__ import annotations

import uuid
from contextvars import ContextVar

# The broker-generated id of the API call being served (never the caller's); sent to
# Vault as X-Request-Id so the broker's and Vault's audit logs join on it.
request_id_var: ContextVar[str] = ContextVar("request_id", default="")

# Vault calls made outside any request (policy refresh, token renewal, the key scheduler,
# audit anchors) carry a request id with this prefix, so the merged timeline tells the
# broker's own upkeep from unexplained use of its identity.
BACKGROUND_PREFIX = "kb-bg-"


def outgoing_request_id() -> str:
    """The X-Request-Id for a backend call now: the request's own id, or a fresh background one."""
    return request_id_var.get() or f"{BACKGROUND_PREFIX}{uuid.uuid4()}"


# Backend calls made while serving the current request, for the audit record:
# (backend, operation, the backend's own call id). None outside a request.
backend_calls_var: ContextVar[list[tuple[str, str, str]] | None] = ContextVar("backend_calls", default=None)


def note_backend_call(backend: str, operation: str, call_id: str) -> None:
    """Remember one backend call of the current request (a no-op outside one)."""
    calls = backend_calls_var.get()
    if calls is not None:
        calls.append((backend, operation, call_id))
