"""The ``kbe1`` message format: header encoding and parsing, key derivation, frame nonces and AAD.

The byte layout and the reasons for it are in ``docs/envelope-format.md``; this module is
its one implementation. Parsing is strict: one canonical encoding per header, every length
bounded before anything is read, anything else :class:`MalformedMessage`.
"""

from __future__ import annotations

import hmac
import itertools
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.envelope.errors import CommitmentMismatch, MalformedMessage, TamperedMessage, TruncatedMessage
from broker.errors import DecryptionFailed
from broker.keys import ciphertext as kb1

MAGIC = b"kbe1"
# The one suite: AES-256-GCM frames, keys derived from a 32-byte data key by HKDF-SHA256.
ALG_AES256GCM_HKDF_SHA256 = 0x01
DATA_KEY_BYTES = 32
MESSAGE_ID_BYTES = 32
COMMITMENT_BYTES = 32
TAG_BYTES = 16
DEFAULT_FRAME_SIZE = 256 * 1024
MAX_FRAME_SIZE = 16 * 1024 * 1024
# Frame numbers are 1..MAX_FRAMES (a u32): the nonce space per derived key is never exhausted.
MAX_FRAMES = 2**32 - 1
MAX_CONTEXT_PAIRS = 64
MAX_CONTEXT_BYTES = 64 * 1024
MAX_WRAPPED_KEYS = 16
MAX_WRAPPED_KEY_BYTES = 8192

FRAME_REGULAR = 0x00
FRAME_FINAL = 0x01

_LABEL_HEADER = b"kbe1 header key"
_LABEL_FRAME = b"kbe1 frame key"
_LABEL_COMMIT = b"kbe1 key commitment"
_FRAME_AAD_PREFIX = b"kbe1 frame"
_HEADER_NONCE = bytes(12)

ContextPairs = tuple[tuple[str, str], ...]


def canonical_context(context: Mapping[str, str] | None) -> ContextPairs:
    """The context as (name, value) pairs sorted by the UTF-8 bytes of the name."""
    items = list((context or {}).items())
    for name, value in items:
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise MalformedMessage("an encryption context maps non-empty text names to text values")
        try:
            name.encode("utf-8"), value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (argv's undecodable bytes): not Unicode text
            raise MalformedMessage("an encryption context holds text that is not valid Unicode") from None
    pairs = sorted(items, key=lambda kv: kv[0].encode("utf-8"))
    if len(pairs) > MAX_CONTEXT_PAIRS:
        raise MalformedMessage(f"an encryption context holds at most {MAX_CONTEXT_PAIRS} fields")
    return tuple(pairs)


def encode_context(pairs: ContextPairs) -> bytes:
    out = [struct.pack(">H", len(pairs))]
    for name, value in pairs:
        for text in (name, value):
            raw = text.encode("utf-8")  # str is Unicode scalar values only when it came from JSON/argv
            if len(raw) > 0xFFFF:
                raise MalformedMessage("an encryption context field is longer than 65535 bytes")
            out.append(struct.pack(">H", len(raw)) + raw)
    encoded = b"".join(out)
    if len(encoded) > MAX_CONTEXT_BYTES:
        raise MalformedMessage(f"the encoded encryption context exceeds {MAX_CONTEXT_BYTES} bytes")
    return encoded


def derive(data_key: bytes | bytearray, message_id: bytes, label: bytes) -> bytes:
    """HKDF-SHA256 of the data key, salted with the message id, for one purpose (``label``)."""
    info = label + bytes([ALG_AES256GCM_HKDF_SHA256])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=message_id, info=info).derive(bytes(data_key))


@dataclass(frozen=True)
class Header:
    """A parsed ``kbe1`` header. ``wrapped`` is outside the header tag (see the format doc)."""

    frame_size: int
    message_id: bytes
    context: ContextPairs
    commitment: bytes
    tag: bytes
    wrapped: tuple[str, ...]
    algorithm: int = ALG_AES256GCM_HKDF_SHA256

    def authenticated_bytes(self) -> bytes:
        """Everything the header tag covers: the header up to and including the commitment."""
        return b"".join(
            (
                MAGIC,
                bytes([self.algorithm]),
                struct.pack(">I", self.frame_size),
                self.message_id,
                encode_context(self.context),
                self.commitment,
            )
        )

    def encode(self) -> bytes:
        parts = [self.authenticated_bytes(), self.tag, bytes([len(self.wrapped)])]
        for text in self.wrapped:
            raw = text.encode("ascii")
            parts.append(struct.pack(">H", len(raw)) + raw)
        return b"".join(parts)

    def with_wrapped(self, wrapped: Sequence[str]) -> Header:
        check_wrapped(wrapped)
        return replace(self, wrapped=tuple(wrapped))

    @property
    def keys(self) -> tuple[str, ...]:
        """The key each wrapped data key names, in header order."""
        return tuple(kb1.decode(text).key for text in self.wrapped)

    def context_dict(self) -> dict[str, str]:
        return dict(self.context)


def check_wrapped(wrapped: Sequence[str]) -> None:
    if not 1 <= len(wrapped) <= MAX_WRAPPED_KEYS:
        raise MalformedMessage(f"a message holds 1 to {MAX_WRAPPED_KEYS} wrapped data keys")
    for text in wrapped:
        if not isinstance(text, str) or not text.isascii() or not 0 < len(text) <= MAX_WRAPPED_KEY_BYTES:
            raise MalformedMessage("a wrapped data key is not a kb1 ciphertext")
        try:
            kb1.decode(text)
        except DecryptionFailed:
            raise MalformedMessage("a wrapped data key is not a kb1 ciphertext") from None


def check_frame_size(frame_size: int) -> None:
    if not 1 <= frame_size <= MAX_FRAME_SIZE:
        raise MalformedMessage(f"the frame size must be 1 to {MAX_FRAME_SIZE} bytes, not {frame_size}")


def seal_header(
    data_key: bytes | bytearray,
    wrapped: Sequence[str],
    context: ContextPairs,
    frame_size: int,
    message_id: bytes,
) -> Header:
    """A header for a new message: commitment and tag computed from the data key."""
    if len(data_key) != DATA_KEY_BYTES or len(message_id) != MESSAGE_ID_BYTES:
        raise MalformedMessage("kbe1 takes a 32-byte data key and a 32-byte message id")
    check_frame_size(frame_size)
    check_wrapped(wrapped)
    commitment = derive(data_key, message_id, _LABEL_COMMIT)
    draft = Header(frame_size, message_id, context, commitment, b"", tuple(wrapped))
    tag = AESGCM(derive(data_key, message_id, _LABEL_HEADER)).encrypt(
        _HEADER_NONCE, b"", draft.authenticated_bytes()
    )
    return replace(draft, tag=tag)


def verify_header(header: Header, data_key: bytes | bytearray) -> bytes:
    """Check the key commitment and the header tag under this data key; return the frame key."""
    if len(data_key) != DATA_KEY_BYTES:
        raise TamperedMessage("the unwrapped data key is not 32 bytes")
    commitment = derive(data_key, header.message_id, _LABEL_COMMIT)
    if not hmac.compare_digest(commitment, header.commitment):
        raise CommitmentMismatch("the data key does not match the header's key commitment")
    try:
        AESGCM(derive(data_key, header.message_id, _LABEL_HEADER)).decrypt(
            _HEADER_NONCE, header.tag, header.authenticated_bytes()
        )
    except InvalidTag:
        raise TamperedMessage("the header failed authentication (an edited field)") from None
    return derive(data_key, header.message_id, _LABEL_FRAME)


def frame_nonce(number: int) -> bytes:
    return bytes(8) + struct.pack(">I", number)


def frame_aad(message_id: bytes, number: int, final: bool, length: int) -> bytes:
    return _FRAME_AAD_PREFIX + message_id + struct.pack(">IBI", number, 1 if final else 0, length)


def read_exact(source: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes: fewer only at the end of the stream (pipes return short reads)."""
    chunk = source.read(size)
    if chunk is None:
        raise MalformedMessage("the source is non-blocking; kbe1 streams need a blocking reader")
    if len(chunk) == size or not chunk:
        return bytes(chunk)
    parts = [chunk]
    got = len(chunk)
    while got < size:
        more = source.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _need(source: BinaryIO, size: int, what: str) -> bytes:
    data = read_exact(source, size)
    if len(data) != size:
        raise TruncatedMessage(f"the message is truncated inside its header ({what})")
    return data


def read_header(source: BinaryIO) -> Header:
    """Parse a header from the stream, leaving it at the first frame. No cryptography yet."""
    magic = read_exact(source, len(MAGIC))
    if magic != MAGIC:
        raise MalformedMessage("not a kbe1 message (the first bytes are not 'kbe1')")
    algorithm = _need(source, 1, "algorithm")[0]
    if algorithm != ALG_AES256GCM_HKDF_SHA256:
        raise MalformedMessage(f"unknown kbe1 algorithm id {algorithm}")
    (frame_size,) = struct.unpack(">I", _need(source, 4, "frame size"))
    check_frame_size(frame_size)
    message_id = _need(source, MESSAGE_ID_BYTES, "message id")
    context = _read_context(source)
    commitment = _need(source, COMMITMENT_BYTES, "key commitment")
    tag = _need(source, TAG_BYTES, "header tag")
    count = _need(source, 1, "wrapped key count")[0]
    if not 1 <= count <= MAX_WRAPPED_KEYS:
        raise MalformedMessage(f"a message holds 1 to {MAX_WRAPPED_KEYS} wrapped data keys, not {count}")
    wrapped = []
    for _ in range(count):
        (size,) = struct.unpack(">H", _need(source, 2, "wrapped key length"))
        if not 0 < size <= MAX_WRAPPED_KEY_BYTES:
            raise MalformedMessage("a wrapped data key is empty or too long")
        raw = _need(source, size, "wrapped key")
        try:
            wrapped.append(raw.decode("ascii"))
        except UnicodeDecodeError:
            raise MalformedMessage("a wrapped data key is not a kb1 ciphertext") from None
    check_wrapped(wrapped)
    return Header(frame_size, message_id, context, commitment, tag, tuple(wrapped), algorithm)


def _read_context(source: BinaryIO) -> ContextPairs:
    (count,) = struct.unpack(">H", _need(source, 2, "context count"))
    if count > MAX_CONTEXT_PAIRS:
        raise MalformedMessage(f"the context holds more than {MAX_CONTEXT_PAIRS} fields")
    pairs: list[tuple[str, str]] = []
    total = 2
    for _ in range(count):
        texts = []
        for what in ("context name", "context value"):
            (size,) = struct.unpack(">H", _need(source, 2, what))
            total += 2 + size
            if total > MAX_CONTEXT_BYTES:
                raise MalformedMessage(f"the encoded encryption context exceeds {MAX_CONTEXT_BYTES} bytes")
            try:
                texts.append(_need(source, size, what).decode("utf-8"))
            except UnicodeDecodeError:
                raise MalformedMessage(f"a {what} is not UTF-8") from None
        pairs.append((texts[0], texts[1]))
    # One spelling only: names non-empty, strictly increasing by their UTF-8 bytes (so unique).
    names = [name.encode("utf-8") for name, _ in pairs]
    if any(not n for n in names) or any(a >= b for a, b in itertools.pairwise(names)):
        raise MalformedMessage("the context is not in canonical order (sorted, unique, non-empty names)")
    return tuple(pairs)
