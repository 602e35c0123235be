"""The broker's self-describing ciphertext: ``kb1:<key-name>:<version>:<base64url payload>``.

Signatures use the same envelope, so verify routes on the version that signed.
Anything that does not parse is a :class:`DecryptionFailed`, with no detail.

One ciphertext has exactly one spelling: the key name follows the name rule, the
version is ASCII digits without a leading zero (``str.isdigit`` would also take
U+0661, U+FF11 and U+00B2), and the payload is unpadded base64url whose unused trailing
bits are zero (so no two strings decode to the same bytes).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from broker.errors import DecryptionFailed
from broker.keys.model import NAME_RE

PREFIX = "kb1"
# Up to 9 digits: far beyond any real rotation count, and never a huge int to parse.
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
_PAYLOAD = re.compile(r"[A-Za-z0-9_-]+")


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
    if not (NAME_RE.fullmatch(key) and _VERSION.fullmatch(version) and _PAYLOAD.fullmatch(body)):
        raise DecryptionFailed()
    try:
        payload = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionFailed() from None
    envelope = Envelope(key, int(version), payload)
    # Non-zero padding bits give a second spelling of the same payload: refuse it.
    if envelope.encode() != text:
        raise DecryptionFailed()
    return envelope
