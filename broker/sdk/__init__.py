"""The keybroker client SDK: :class:`Client` (blocking, thread-safe) and :class:`AsyncClient` (asyncio).

    from broker.sdk import Client

    with Client() as kb:  # KEYBROKER_ADDR (several, comma-separated) and the KEYBROKER_* TLS files
        sealed = kb.encrypt("payments", b"card 4111", {"tenant": "acme"})
        assert kb.decrypt("payments", sealed.ciphertext, {"tenant": "acme"}) == b"card 4111"

Errors are :mod:`broker.sdk.errors` (one tree under ``KeybrokerError``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.sdk import errors
from broker.sdk._calls import Response, new_idempotency_key
from broker.sdk._settings import parse_addresses
from broker.sdk.client import Client
from broker.sdk.errors import KeybrokerError
from broker.sdk.types import DataKey, Sealed, Signature

if TYPE_CHECKING:
    from broker.sdk.aclient import AsyncClient

__all__ = [
    "AsyncClient",
    "Client",
    "DataKey",
    "KeybrokerError",
    "Response",
    "Sealed",
    "Signature",
    "errors",
    "new_idempotency_key",
    "parse_addresses",
]


def __getattr__(name: str) -> Any:
    # AsyncClient pulls in aiohttp (about a second on a busy machine); the CLI and other
    # blocking users never pay for it.
    if name == "AsyncClient":
        from broker.sdk.aclient import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
