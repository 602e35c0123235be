"""The keybroker client SDK: :class:`Client` (blocking, thread-safe) and :class:`AsyncClient` (asyncio).

    from broker.sdk import Client

    with Client() as kb:  # KEYBROKER_ADDR (several, comma-separated) and the KEYBROKER_* TLS files
        sealed = kb.encrypt("payments", b"card 4111", {"tenant": "acme"})
        assert kb.decrypt("payments", sealed.ciphertext, {"tenant": "acme"}) == b"card 4111"

Errors are :mod:`broker.sdk.errors` (one tree under ``KeybrokerError``).
"""

from __future__ import annotations

from broker.sdk import errors
from broker.sdk._calls import Response, new_idempotency_key
from broker.sdk._settings import parse_addresses
from broker.sdk.aclient import AsyncClient
from broker.sdk.client import Client
from broker.sdk.errors import KeybrokerError
from broker.sdk.types import DataKey, Sealed, Signature

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
