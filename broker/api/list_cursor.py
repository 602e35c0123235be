"""Key-listing cursors that name no key: the ``next`` of ``GET /v1/keys`` is sealed, not a name.

A page is cut after at most ``SCAN_PER_PAGE * limit`` registry entries, so it can end on a key
the caller may not read; a plain name as ``next`` then handed out that key's name, and a caller
allowed only ``key.list`` could walk every name in the registry. So the cursor is the name
encrypted (AES-256-GCM) under a key derived from the audit HMAC key (which every replica of a
deployment shares, so any replica continues another's listing) and bound, as associated data, to
the caller and the listing's filters: another caller, another filter or an edited cursor is a
400. The nonce is derived from what is sealed (as in SIV), so one position gives one cursor, and
a client can tell a cursor that did not move.

A plain key name is still accepted as ``after``: a caller naming a key learns nothing from
where the listing resumes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import re
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.errors import BadRequest
from broker.keys.model import NAME_RE

# "~" is no key-name character, so a cursor is never taken for a name, nor a name for a cursor.
PREFIX = "~c1."
# A sealed name of at most 64 characters: 12 + 64 + 16 bytes, 123 base64url characters.
MAX_CHARS = 160
_NONCE = 12
_TAG = 16
_TOKEN_RE = re.compile(r"~c1\.[A-Za-z0-9_-]{38,156}")
_REFUSED = "'after' must be a key name or the 'next' of an earlier page of this same listing"


@functools.lru_cache(maxsize=4)
def _keys(secret: bytes) -> tuple[AESGCM, bytes]:
    derived = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=None, info=b"keybroker key-listing cursor v1"
    ).derive(secret)
    return AESGCM(derived[:32]), derived[32:]


def _bound_to(principal: str, filters: Mapping[str, str]) -> bytes:
    return json.dumps(
        {"principal": principal, "filters": dict(sorted(filters.items()))},
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode()


def is_cursor(value: str) -> bool:
    """Whether ``after`` is meant as a sealed cursor (else it must be a key name)."""
    return value.startswith(PREFIX)


def seal(secret: bytes, principal: str, filters: Mapping[str, str], name: str) -> str:
    """The cursor that continues this caller's listing (with these filters) after ``name``."""
    aead, nonce_key = _keys(secret)
    bound = _bound_to(principal, filters)
    nonce = hmac.new(nonce_key, bound + b"\0" + name.encode(), hashlib.sha256).digest()[:_NONCE]
    sealed = nonce + aead.encrypt(nonce, name.encode(), bound)
    return PREFIX + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()


def open_cursor(secret: bytes, principal: str, filters: Mapping[str, str], token: str) -> str:
    """The key name a cursor continues after; 400 unless this caller sealed it for these filters."""
    if len(token) > MAX_CHARS or not _TOKEN_RE.fullmatch(token):
        raise BadRequest(_REFUSED)
    body = token[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise BadRequest(_REFUSED) from None
    # Only the encoding seal() writes: spare bits set in the last character are an edit too.
    if len(raw) <= _NONCE + _TAG or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != body:
        raise BadRequest(_REFUSED)
    aead, _ = _keys(secret)
    try:
        name = aead.decrypt(raw[:_NONCE], raw[_NONCE:], _bound_to(principal, filters)).decode("ascii")
    except (InvalidTag, UnicodeDecodeError):
        raise BadRequest(_REFUSED) from None
    if not NAME_RE.fullmatch(name):  # only names the broker sealed; checked all the same
        raise BadRequest(_REFUSED)
    return name
