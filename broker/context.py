"""Per-request context that follows work into threads and backend calls."""

from __future__ import annotations

from contextvars import ContextVar

# The request id of the API call being served; sent to Vault as X-Request-Id so the
# broker's and Vault's audit logs join on it.
request_id_var: ContextVar[str] = ContextVar("request_id", default="")

# Backend calls made while serving the current request, for the audit record:
# (backend, operation, the backend's own call id). None outside a request.
backend_calls_var: ContextVar[list[tuple[str, str, str]] | None] = ContextVar("backend_calls", default=None)


def note_backend_call(backend: str, operation: str, call_id: str) -> None:
    """Remember one backend call of the current request (a no-op outside one)."""
    calls = backend_calls_var.get()
    if calls is not None:
        calls.append((backend, operation, call_id))
