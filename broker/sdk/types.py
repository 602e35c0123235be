"""What the SDK's crypto methods return. A data key's plaintext never shows in ``repr``/``str``."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DataKey", "Sealed", "Signature"]


@dataclass(frozen=True)
class Sealed:
    """A kb1 ciphertext made by ``key`` at ``key_version`` (store the string as it is)."""

    ciphertext: str
    key_version: int
    key: str


@dataclass(frozen=True)
class DataKey:
    """A fresh data key: use ``plaintext`` locally and forget it; store ``ciphertext``."""

    # repr=False: the key material must never reach a log line, a traceback or a debugger's summary.
    plaintext: bytes = field(repr=False)
    ciphertext: str
    key_version: int
    key: str

    def sealed(self) -> Sealed:
        """The wrapped half alone, to hand to code that must not hold the data key."""
        return Sealed(self.ciphertext, self.key_version, self.key)


@dataclass(frozen=True)
class Signature:
    """A kb1 signature (DER ECDSA inside) by ``key`` at ``key_version``."""

    signature: str
    key_version: int
    key: str
