"""The broker's self-describing ciphertext: ``kb1:<key-name>:<version>:<base64url payload>``.

Signatures use the same envelope, so verify routes on the version that signed.
Anything that does not parse is a :class:`DecryptionFailed`, with no detail.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from broker.errors import DecryptionFailed

PREFIX = "kb1"


@dataclass(frozen=True)
class Envelope:
    key: str
    version: int
    payload: bytes

    def encode(self) -> str:
        body = base64.urlsafe_b64encode(self.payload).rstrip(b"=").decode()
        return f"{PREFIX}:{self.key}:{self.version}:{body}"


def decode(text: str) -> Envelope:
    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) != 4 or parts[0] != PREFIX:
        raise DecryptionFailed()
    _, key, version, body = parts
    if not key or not version.isdigit() or not body:
        raise DecryptionFailed()
    try:
        payload = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionFailed() from None
    return Envelope(key, int(version), payload)
