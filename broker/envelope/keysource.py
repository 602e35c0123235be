"""Where data keys come from: the structural protocol the envelope needs.

``broker.sdk.Client`` satisfies :class:`KeySource` as it is (so does anything else with the same
three methods); :class:`CountingKeySource` counts the calls one passes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


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


class CountingKeySource:
    """A :class:`KeySource` that counts the broker calls it passes on (the cache's effect, for
    benchmarks and tests); ``broker.sdk.Client`` does the calling."""

    def __init__(self, inner: KeySource) -> None:
        self._inner = inner
        self.calls = 0

    def generate_data_key(
        self, key: str, context: Mapping[str, str] | None = None, *, size: int = 32
    ) -> DataKeyLike:
        self.calls += 1
        return self._inner.generate_data_key(key, context, size=size)

    def decrypt(self, key: str, ciphertext: str, context: Mapping[str, str] | None = None) -> bytes:
        self.calls += 1
        return self._inner.decrypt(key, ciphertext, context)

    def rewrap(
        self,
        key: str,
        ciphertext: str,
        context: Mapping[str, str] | None = None,
        *,
        to_key: str | None = None,
    ) -> SealedLike:
        self.calls += 1
        return self._inner.rewrap(key, ciphertext, context, to_key=to_key)
