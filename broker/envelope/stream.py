"""Frame-by-frame sealing and opening of a ``kbe1`` body under a known data key.

Memory stays at about two frames whatever the message size: read a frame, write a frame.
A frame's plaintext is written only after its tag verified (``AESGCM.decrypt`` checks
before it returns); a stream that ends without its final frame, or goes on after it, is an
error. Output written before such an error is the caller's to discard (the CLI writes to
a temporary file and removes it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.envelope.errors import EnvelopeError, MalformedMessage, TamperedMessage, TruncatedMessage
from broker.envelope.format import (
    FRAME_FINAL,
    FRAME_REGULAR,
    MAX_FRAMES,
    TAG_BYTES,
    Header,
    frame_aad,
    frame_nonce,
    read_exact,
)

Progress = Callable[[int], None]
_REGULAR_PREFIX = bytes([FRAME_REGULAR])
_FINAL_PREFIX = bytes([FRAME_FINAL])


def seal_body(
    header: Header,
    frame_key: bytes,
    source: BinaryIO,
    sink: BinaryIO,
    *,
    max_bytes: int | None = None,
    progress: Progress | None = None,
) -> int:
    """Encrypt ``source`` to frames on ``sink``; return the plaintext length.

    ``max_bytes`` bounds the plaintext (a cached data key was charged that many bytes); a
    source that turns out longer is refused before the extra frame is written.
    """
    aead = AESGCM(frame_key)
    size, mid = header.frame_size, header.message_id
    current = read_exact(source, size)
    number, total = 1, 0
    while True:
        following = read_exact(source, size) if len(current) == size else b""
        total += len(current)
        if max_bytes is not None and total > max_bytes:
            raise EnvelopeError(f"the input is longer than the {max_bytes} bytes it was declared to be")
        if number > MAX_FRAMES:
            raise EnvelopeError(f"a kbe1 message holds at most {MAX_FRAMES} frames; use larger frames")
        final = not following
        aad = frame_aad(mid, number, final, len(current))
        sealed = aead.encrypt(frame_nonce(number), current, aad)
        # Two writes rather than one concatenation: no copy of the frame just to prefix 1-5 bytes.
        sink.write(_FINAL_PREFIX + struct.pack(">I", len(current)) if final else _REGULAR_PREFIX)
        sink.write(sealed)
        if progress is not None:
            progress(len(current))
        if final:
            return total
        current, number = following, number + 1


def open_body(
    header: Header,
    frame_key: bytes,
    source: BinaryIO,
    sink: BinaryIO,
    *,
    progress: Progress | None = None,
) -> int:
    """Verify and decrypt the frames of ``source`` to ``sink``; return the plaintext length."""
    aead = AESGCM(frame_key)
    size, mid = header.frame_size, header.message_id
    number, total = 1, 0
    while True:
        kind = source.read(1)
        if not kind:
            raise TruncatedMessage(
                f"the message is truncated: it ends before its final frame (after {number - 1} frames)"
            )
        if number > MAX_FRAMES:
            raise MalformedMessage(f"more than {MAX_FRAMES} frames")
        if kind[0] == FRAME_REGULAR:
            length = size
        elif kind[0] == FRAME_FINAL:
            raw = read_exact(source, 4)
            if len(raw) != 4:
                raise TruncatedMessage("the message is truncated inside its final frame")
            (length,) = struct.unpack(">I", raw)
            if length > size:
                raise TamperedMessage("the final frame claims more than a frame of plaintext")
        else:
            raise MalformedMessage(f"frame {number} has an unknown type byte")
        final = kind[0] == FRAME_FINAL
        body = read_exact(source, length + TAG_BYTES)
        if len(body) != length + TAG_BYTES:
            raise TruncatedMessage(f"the message is truncated inside frame {number}")
        try:
            plain = aead.decrypt(frame_nonce(number), body, frame_aad(mid, number, final, length))
        except InvalidTag:
            raise TamperedMessage(
                f"frame {number} failed authentication (changed, reordered, from another message, "
                "or marked final where it was not)"
            ) from None
        sink.write(plain)
        total += length
        if progress is not None:
            progress(length)
        if final:
            if source.read(1):
                raise MalformedMessage("data follows the final frame")
            return total
        number += 1
