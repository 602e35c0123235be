"""Streaming envelope encryption in the ``kbe1`` format (``docs/envelope-format.md``).

::

    from broker.envelope import Envelope, DataKeyCache
    env = Envelope(client)                      # a broker.sdk.Client (or any KeySource)
    with open("big.bin", "rb") as src, open("big.bin.kbe", "wb") as dst:
        env.encrypt(["payments", "escrow"], src, dst, {"tenant": "acme"})
"""

from __future__ import annotations

from broker.envelope.cache import CacheStats, DataKeyCache
from broker.envelope.errors import (
    ContextMismatch,
    EnvelopeError,
    MalformedMessage,
    NoUsableKey,
    TamperedMessage,
    TruncatedMessage,
)
from broker.envelope.format import DEFAULT_FRAME_SIZE, MAX_FRAME_SIZE, Header, read_header
from broker.envelope.keysource import CountingKeySource, DataKeyLike, KeySource, SealedLike
from broker.envelope.messages import Envelope, open_with_data_key, seal_with_data_key

__all__ = [
    "DEFAULT_FRAME_SIZE",
    "MAX_FRAME_SIZE",
    "CacheStats",
    "ContextMismatch",
    "CountingKeySource",
    "DataKeyCache",
    "DataKeyLike",
    "Envelope",
    "EnvelopeError",
    "Header",
    "KeySource",
    "MalformedMessage",
    "NoUsableKey",
    "SealedLike",
    "TamperedMessage",
    "TruncatedMessage",
    "open_with_data_key",
    "read_header",
    "seal_with_data_key",
]
