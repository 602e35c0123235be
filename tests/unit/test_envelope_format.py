"""The kbe1 format on a data key in hand (no broker): round trips, and every tamper kind refused."""

from __future__ import annotations

import io
import os
import struct

import pytest

from broker.envelope import (
    ContextMismatch,
    MalformedMessage,
    TamperedMessage,
    TruncatedMessage,
    open_with_data_key,
    read_header,
    seal_with_data_key,
)
from broker.envelope.errors import EnvelopeError
from broker.envelope.format import TAG_BYTES

KEY = bytes(range(32))
WRAPPED = ["kb1:vectors:1:AAAA"]
CONTEXT = {"tenant": "acme", "purpose": "test"}
FRAME = 16


def seal(
    data: bytes, *, key: bytes = KEY, context: dict[str, str] | None = None, wrapped: list[str] | None = None
) -> bytes:
    out = io.BytesIO()
    seal_with_data_key(
        key,
        wrapped or WRAPPED,
        io.BytesIO(data),
        out,
        CONTEXT if context is None else context,
        frame_size=FRAME,
    )
    return out.getvalue()


def opened(message: bytes, *, key: bytes = KEY, context: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    open_with_data_key(key, io.BytesIO(message), out, CONTEXT if context is None else context)
    return out.getvalue()


def split(message: bytes) -> tuple[bytes, list[bytes]]:
    """The header bytes and each frame's bytes (regular frames are fixed size here)."""
    header_len = len(read_header_bytes(message))
    frames, at = [], header_len
    while at < len(message):
        if message[at] == 0:
            size = 1 + FRAME + TAG_BYTES
        else:
            (length,) = struct.unpack(">I", message[at + 1 : at + 5])
            size = 5 + length + TAG_BYTES
        frames.append(message[at : at + size])
        at += size
    return message[:header_len], frames


def read_header_bytes(message: bytes) -> bytes:
    stream = io.BytesIO(message)
    read_header(stream)
    return message[: stream.tell()]


@pytest.mark.parametrize("size", [0, 1, FRAME - 1, FRAME, FRAME + 1, 3 * FRAME, 3 * FRAME + 5])
def test_round_trip_at_every_frame_boundary(size: int) -> None:
    """Empty input, partial, exact and multi-frame bodies all come back byte for byte."""
    data = os.urandom(size)
    assert opened(seal(data)) == data


def test_context_order_does_not_matter_but_its_content_does() -> None:
    """The context is canonical (sorted): another order opens; another value is refused by name, not value."""
    message = seal(b"secret", context={"b": "2", "a": "1"})

    assert opened(message, context={"a": "1", "b": "2"}) == b"secret"
    with pytest.raises(ContextMismatch) as caught:
        opened(message, context={"a": "1", "b": "3"})
    assert "'b'" in str(caught.value)
    assert "3" not in str(caught.value).replace("'b'", "")


def test_truncation_is_detected() -> None:
    """Dropping the final frame, or cutting inside any frame or the header, is an error."""
    message = seal(os.urandom(3 * FRAME + 5))
    header, frames = split(message)

    with pytest.raises(TruncatedMessage):
        opened(header + b"".join(frames[:-1]))
    with pytest.raises(TruncatedMessage):
        opened(message[:-1])
    with pytest.raises(TruncatedMessage):
        opened(header)
    with pytest.raises(TruncatedMessage):
        opened(header[:-3])


def test_truncation_at_an_exact_frame_boundary_is_detected() -> None:
    """A body whose last regular frame is followed by nothing (no final frame) is truncated, not short."""
    message = seal(os.urandom(2 * FRAME))
    header, frames = split(message)
    assert len(frames) == 2  # a full final frame: regular + final(16)

    with pytest.raises(TruncatedMessage):
        opened(header + frames[0])


def test_reordered_frames_are_detected() -> None:
    message = seal(os.urandom(3 * FRAME + 1))
    header, frames = split(message)

    with pytest.raises(TamperedMessage):
        opened(header + frames[1] + frames[0] + frames[2] + frames[3])


def test_a_frame_from_another_message_under_the_same_data_key_is_detected() -> None:
    """A cached data key seals many messages: a frame moved between two of them does not verify."""
    data = os.urandom(2 * FRAME + 3)
    header_a, frames_a = split(seal(data))
    _, frames_b = split(seal(data))

    with pytest.raises(TamperedMessage):
        opened(header_a + frames_a[0] + frames_b[1] + frames_a[2])


def test_a_regular_frame_cannot_be_passed_off_as_final() -> None:
    """Rewriting a regular frame's type byte to 'final' (to truncate silently) fails its tag."""
    message = seal(os.urandom(2 * FRAME + 3))
    header, frames = split(message)
    forged = b"\x01" + struct.pack(">I", FRAME) + frames[0][1:]

    with pytest.raises(TamperedMessage):
        opened(header + forged)


def test_appended_data_is_refused() -> None:
    message = seal(b"abc")
    with pytest.raises(MalformedMessage):
        opened(message + b"\x00")
    with pytest.raises(EnvelopeError):
        opened(message + message)


def test_every_header_byte_is_covered() -> None:
    """Flipping any bit of the authenticated header (or its tag) makes the message unusable."""
    message = seal(b"some data here", context={"k": "v"})
    header = read_header_bytes(message)
    tagged_end = len(header) - 1 - 2 - len(WRAPPED[0])  # count byte, length, the one wrapped key
    for at in range(tagged_end):
        changed = bytearray(message)
        changed[at] ^= 0x01
        with pytest.raises(EnvelopeError):
            opened(bytes(changed), context={"k": "v"})


def test_an_edited_context_in_the_header_is_detected_even_when_the_caller_asks_for_it() -> None:
    """An attacker rewrites tenant=acme to tenant=acmf and opens with tenant=acmf: the header tag fails."""
    message = seal(b"payload", context={"tenant": "acme"})
    forged = message.replace(b"acme", b"acmf", 1)

    with pytest.raises(TamperedMessage):
        opened(forged, context={"tenant": "acmf"})


def test_a_wrong_data_key_fails_the_commitment() -> None:
    """A wrapped key swapped for the wrapping of another data key gives a key the header refuses."""
    message = seal(b"payload")
    with pytest.raises(TamperedMessage, match="commitment"):
        opened(message, key=bytes(32))


def test_non_canonical_headers_are_refused() -> None:
    """Unsorted context, an unknown algorithm, a zero frame size or a non-kb1 wrapped key: malformed."""
    good = seal(b"x", context={"a": "1", "b": "2"})
    unsorted = good.replace(b"\x00\x01a\x00\x011\x00\x01b\x00\x012", b"\x00\x01b\x00\x012\x00\x01a\x00\x011")
    assert unsorted != good
    other_alg = good[:4] + b"\x02" + good[5:]
    zero_frames = good[:5] + b"\x00\x00\x00\x00" + good[9:]
    for bad in (unsorted, other_alg, zero_frames, b"kbe0" + good[4:], b"", good.replace(b"kb1:", b"kb2:")):
        with pytest.raises(MalformedMessage):
            opened(bad, context={"a": "1", "b": "2"})


def test_output_of_a_tampered_frame_is_never_written() -> None:
    """Frames before the bad one may be written; the bad frame's plaintext never is."""
    data = b"A" * FRAME + b"B" * FRAME + b"C"
    header, frames = split(seal(data))
    bad = bytearray(frames[1])
    bad[5] ^= 0xFF
    out = io.BytesIO()

    with pytest.raises(TamperedMessage):
        open_with_data_key(KEY, io.BytesIO(header + frames[0] + bytes(bad) + frames[2]), out, CONTEXT)
    assert out.getvalue() == b"A" * FRAME


def test_a_context_that_is_not_text_is_refused_before_anything_is_sealed() -> None:
    """A lone surrogate (what argv makes of undecodable bytes) or a non-text value: malformed, not a crash."""
    for bad in ({"k": "\udcff"}, {"\ud800": "v"}, {"k": 1}, {"": "v"}):
        with pytest.raises(MalformedMessage):
            seal(b"x", context=bad)  # type: ignore[arg-type]
