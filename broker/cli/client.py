"""The command line's broker client is the SDK's (one client code path: retries, fail-over over
several addresses, keep-alive). The names the CLI's modules use are kept here."""

from __future__ import annotations

from broker.sdk import Client as BrokerClient
from broker.sdk.errors import KeybrokerError as RemoteError
from broker.sdk.errors import TransportError as Unreachable

__all__ = ["BrokerClient", "RemoteError", "Unreachable"]
