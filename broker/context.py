"""Per-request context that follows work into threads and backend calls."""

from __future__ import annotations

from contextvars import ContextVar

# The request id of the API call being served; sent to Vault as X-Request-Id so the
# broker's and Vault's audit logs join on it.
request_id_var: ContextVar[str] = ContextVar("request_id", default="")
