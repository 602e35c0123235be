"""Where data keys come from: the structural protocol the envelope needs, and an adapter.

``broker.sdk.Client`` satisfies :class:`KeySource` as it is. :class:`CallKeySource` makes one
from any ``call(method, path, body)`` JSON function (the CLI's ``BrokerClient.call``, the
SDK's ``Client.call``), so the envelope works with either.
"""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.keys import ciphertext as kb1


class DataKeyLike(Protocol):
    @property
    def plaintext(self) -> bytes: ...
    @property
    def ciphertext(self) -> str: ...
    @property
    def key_version(self) -> int: ...
    @property
    def key(self) -> str: ...


class SealedLike(Protocol):
    @property
    def ciphertext(self) -> str: ...
    @property
    def key_version(self) -> int: ...
    @property
    def key(self) -> str: ...


class KeySource(Protocol):
    def generate_data_key(
        self, key: str, context: Mapping[str, str] | None = None, *, size: int = 32
    ) -> DataKeyLike: ...

    def decrypt(self, key: str, ciphertext: str, context: Mapping[str, str] | None = None) -> bytes: ...

    def rewrap(
        self,
        key: str,
        ciphertext: str,
        context: Mapping[str, str] | None = None,
        *,
        to_key: str | None = None,
    ) -> SealedLike: ...


@dataclass(frozen=True)
class DataKey:
    """A fresh data key: ``plaintext`` never appears in the repr."""

    plaintext: bytes = field(repr=False)
    ciphertext: str
    key_version: int
    key: str


@dataclass(frozen=True)
class Sealed:
    ciphertext: str
    key_version: int
    key: str


JsonCall = Callable[..., Any]


def _path(key: str, action: str) -> str:
    return f"/v1/keys/{urllib.parse.quote(key, safe='')}/{action}"


class CallKeySource:
    """A :class:`KeySource` over a ``call(method, path, body)`` function returning parsed JSON.

    Errors are whatever ``call`` raises for a problem answer (``RemoteError`` in the CLI).
    """

    def __init__(self, call: JsonCall) -> None:
        self._call = call
        self.calls = 0  # broker calls made, for the cache's effect (bench, tests)

    def generate_data_key(
        self, key: str, context: Mapping[str, str] | None = None, *, size: int = 32
    ) -> DataKey:
        self.calls += 1
        body = {"bytes": size, "context": dict(context or {}), "include_plaintext": True}
        out = self._call("POST", _path(key, "datakey"), body)
        text = str(out["ciphertext"])
        plaintext = base64.b64decode(out["plaintext"])
        return DataKey(plaintext, text, int(out["key_version"]), kb1.decode(text).key)

    def decrypt(self, key: str, ciphertext: str, context: Mapping[str, str] | None = None) -> bytes:
        self.calls += 1
        body = {"ciphertext": ciphertext, "context": dict(context or {})}
        out = self._call("POST", _path(key, "decrypt"), body)
        return base64.b64decode(out["plaintext"])

    def rewrap(
        self,
        key: str,
        ciphertext: str,
        context: Mapping[str, str] | None = None,
        *,
        to_key: str | None = None,
    ) -> Sealed:
        self.calls += 1
        body: dict[str, Any] = {"ciphertext": ciphertext, "context": dict(context or {})}
        if to_key is not None:
            body["to_key"] = to_key
        out = self._call("POST", _path(key, "rewrap"), body)
        text = str(out["ciphertext"])
        return Sealed(text, int(out["key_version"]), str(out.get("key") or kb1.decode(text).key))
