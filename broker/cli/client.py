"""The command line's broker client is the SDK's (one client code path: retries, fail-over over
several addresses, keep-alive). The names the CLI's modules (and their tests) use are kept here."""

from __future__ import annotations

import ssl
from collections.abc import Sequence

from broker.sdk import Client
from broker.sdk.errors import KeybrokerError as RemoteError
from broker.sdk.errors import TransportError as Unreachable

__all__ = ["BrokerClient", "RemoteError", "Unreachable"]


class BrokerClient(Client):
    """The SDK client, built as the CLI always built its client: address(es) and a TLS context."""

    def __init__(self, addresses: str | Sequence[str], context: ssl.SSLContext, timeout: float = 30) -> None:
        super().__init__(addresses, ssl_context=context, timeout=timeout)
