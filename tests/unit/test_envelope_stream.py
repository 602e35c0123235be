"""The frame streamer on awkward streams: every cut is caught with only verified whole frames
written; short reads, sources without ``readinto`` and sinks that take a few bytes per write
round-trip; a failing sink's error reaches the caller and no writer thread outlives a call."""

from __future__ import annotations

import io
import os
import threading
from typing import Any

import pytest

from broker.envelope import EnvelopeError, open_with_data_key, read_header, seal_with_data_key

KEY = bytes(range(32))
WRAPPED = ["kb1:vectors:1:AAAA"]
FRAME = 16


class Trickle(io.RawIOBase):
    """A raw stream that reads or writes at most ``step`` bytes per call (a pipe, a socket)."""

    def __init__(self, data: bytes = b"", step: int = 7, fail_after: int | None = None) -> None:
        self.data, self.at, self.step, self.fail_after = data, 0, step, fail_after
        self.written = bytearray()

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self.data[self.at : self.at + min(self.step, len(buffer))]
        buffer[: len(chunk)] = chunk
        self.at += len(chunk)
        return len(chunk)

    def write(self, data: Any) -> int:
        if self.fail_after is not None and len(self.written) >= self.fail_after:
            raise OSError(28, "No space left on device")
        taken = bytes(data[: self.step])
        self.written += taken
        return len(taken)


class ReadOnly:
    """A source with ``read`` only (no ``readinto``), returning short reads."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(min(size, 5) if size > 0 else size)


def _seal(data: bytes) -> bytes:
    out = io.BytesIO()
    seal_with_data_key(KEY, WRAPPED, io.BytesIO(data), out, frame_size=FRAME)
    return out.getvalue()


def _writers() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "kbe1-writer")


@pytest.mark.parametrize("size", [4 * FRAME, 4 * FRAME + 3])
def test_every_cut_is_refused_and_only_verified_whole_frames_are_written(size: int) -> None:
    """Cut a message at every byte after its header (the final frame full or short): always an
    EnvelopeError, and the output is exactly the whole frames before the cut."""
    data = os.urandom(size)
    message = _seal(data)
    stream = io.BytesIO(message)
    read_header(stream)
    header_len = stream.tell()
    for cut in range(header_len, len(message)):
        out = io.BytesIO()
        with pytest.raises(EnvelopeError):
            open_with_data_key(KEY, io.BytesIO(message[:cut]), out)
        written = out.getvalue()
        assert len(written) % FRAME == 0, cut
        assert written == data[: len(written)], cut
    assert _writers() == 0


@pytest.mark.parametrize("size", [0, 5, FRAME, 3 * FRAME, 3 * FRAME + 1])
def test_short_reads_sources_without_readinto_and_short_writes_round_trip(size: int) -> None:
    """A source giving a few bytes per read, with or without ``readinto``, and a raw sink taking a
    few bytes per write (it returns how many it took) lose nothing in either direction."""
    data = os.urandom(size)
    sealed = Trickle(step=5)
    seal_with_data_key(KEY, WRAPPED, Trickle(data, step=3), sealed, frame_size=FRAME)  # type: ignore[arg-type]
    assert bytes(sealed.written) == _seal_same_id(data, bytes(sealed.written))

    opened = Trickle(step=3)
    open_with_data_key(KEY, ReadOnly(bytes(sealed.written)), opened)  # type: ignore[arg-type]
    assert bytes(opened.written) == data
    assert _writers() == 0


def _seal_same_id(data: bytes, made: bytes) -> bytes:
    """What a plain BytesIO round gives with the message id ``made`` used (bytes 9..41)."""
    out = io.BytesIO()
    seal_with_data_key(KEY, WRAPPED, io.BytesIO(data), out, frame_size=FRAME, message_id=made[9:41])
    return out.getvalue()


def test_a_failing_sink_raises_its_error_and_leaves_no_thread() -> None:
    """A disk that fills up part way: encrypt and decrypt raise the sink's OSError to the caller
    (not a hang, not a swallowed error) and the writer thread is gone."""
    data = os.urandom(20 * FRAME)
    with pytest.raises(OSError, match="No space"):
        seal_with_data_key(
            KEY,
            WRAPPED,
            io.BytesIO(data),
            Trickle(step=1000, fail_after=100),  # type: ignore[arg-type]
            frame_size=FRAME,
        )
    with pytest.raises(OSError, match="No space"):
        open_with_data_key(KEY, io.BytesIO(_seal(data)), Trickle(step=1000, fail_after=100))  # type: ignore[arg-type]
    assert _writers() == 0
