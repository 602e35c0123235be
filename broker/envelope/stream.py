"""Frame-by-frame sealing and opening of a ``kbe1`` body under a known data key.

Memory stays bounded whatever the message size: a few frame buffers, allocated once per
message and reused for every frame (no per-frame objects of frame size). A frame's plaintext
is handed to the sink only after its tag verified; a stream that ends without its final
frame, or goes on after it, is an error. Output written before such an error is the
caller's to discard (the CLI writes to a temporary file and removes it).

Speed: the costly steps are the kernel's copies (``readinto``, and above all ``write`` into
new page-cache pages), not AES-GCM. All three release the GIL, so a message of more than one
frame is written by a helper thread, in order, while this thread reads and seals the next
frames (at most ``_in_flight`` frames queued): two cores, each about equally busy. A
one-frame message (small records) is written inline: no thread, no buffer beyond its size.
"""

from __future__ import annotations

import queue
import struct
import threading
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
_FINAL_HEAD = 5  # type byte and u32 length before a final frame's ciphertext
# Bytes of frames queued to the writer thread (at least two frames whatever their size).
_IN_FLIGHT_BYTES = 4 * 1024 * 1024


def _in_flight(frame_size: int) -> int:
    return max(2, min(8, _IN_FLIGHT_BYTES // frame_size))


def _fill(source: BinaryIO, view: memoryview) -> int:
    """Read into ``view`` until it is full or the stream ends; return the bytes read.

    Pipes return short reads, so loop; ``readinto`` when the source has it (no new object
    per read), else ``read`` and one copy.
    """
    readinto = getattr(source, "readinto", None)
    got, want = 0, len(view)
    while got < want:
        if readinto is not None:
            n = readinto(view[got:])
        else:
            chunk = source.read(want - got)
            n = None if chunk is None else len(chunk)
            if n:
                view[got : got + n] = chunk
        if n is None:
            raise MalformedMessage("the source is non-blocking; kbe1 streams need a blocking reader")
        if n == 0:
            break
        got += n
    return got


def write_all(sink: BinaryIO, data: memoryview | bytes) -> None:
    """``write`` everything: a raw (unbuffered) file may accept less than it was given."""
    view = memoryview(data)
    while view:
        n = sink.write(view)
        if n is None:
            raise EnvelopeError("the sink is non-blocking; kbe1 streams need a blocking writer")
        if not isinstance(n, int) or n >= len(view):
            return
        view = view[n:]


class _Writer:
    """Writes frames to the sink from a helper thread, in order, out of reusable buffers.

    Nothing is allocated or started until the first ``take``. ``take`` gives a free buffer
    (at most ``count`` exist: a caller ahead of the sink waits, which bounds the memory);
    ``put`` queues a slice of it. A failed write is raised in the caller's thread at its next
    ``take``/``put``/``finish``. After the caller's own failure ``abandon`` still writes the
    frames queued (as one thread would have: with decrypt, every frame before the failing
    one) and lets the caller's error win over a write's.
    """

    def __init__(self, sink: BinaryIO, buffer_size: int, count: int) -> None:
        self._sink = sink
        self._buffer_size = buffer_size
        self._unmade = count
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._todo: queue.SimpleQueue[tuple[bytearray, int, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            buffer, start, end = item
            if self._error is None:
                try:
                    write_all(self._sink, memoryview(buffer)[start:end])
                except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
                    self._error = exc
            self._free.put(buffer)

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def take(self) -> bytearray:
        self._raise_failure()
        if self._unmade and self._free.empty():
            self._unmade -= 1
            return bytearray(self._buffer_size)
        buffer = self._free.get()
        self._raise_failure()
        return buffer

    def put(self, buffer: bytearray, start: int, end: int) -> None:
        self._raise_failure()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kbe1-writer", daemon=True)
            self._thread.start()
        self._todo.put((buffer, start, end))

    def _stop(self) -> None:
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        """Wait until every queued frame is written; raise a write's failure."""
        self._stop()
        self._raise_failure()

    def abandon(self) -> None:
        self._stop()


def _check_count(number: int, total: int, max_bytes: int | None) -> None:
    if max_bytes is not None and total > max_bytes:
        raise EnvelopeError(f"the input is longer than the {max_bytes} bytes it was declared to be")
    if number > MAX_FRAMES:
        raise EnvelopeError(f"a kbe1 message holds at most {MAX_FRAMES} frames; use larger frames")


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
    source that turns out longer is refused before the extra frame is written. "Final" is
    decided by reading one frame ahead (a body of whole frames ends with a full final frame).
    """
    aead = AESGCM(frame_key)
    size, mid = header.frame_size, header.message_id
    first = read_exact(source, size)
    if len(first) < size:
        # The whole body is one short final frame (small records): no buffers, no thread.
        _check_count(1, len(first), max_bytes)
        sealed = aead.encrypt(frame_nonce(1), first, frame_aad(mid, 1, True, len(first)))
        write_all(sink, struct.pack(">BI", FRAME_FINAL, len(first)) + sealed)
        if progress is not None:
            progress(len(first))
        return len(first)
    # Output buffers are laid out [5 bytes of room][ciphertext][tag] so that a frame is one
    # write: a regular frame's type byte goes at 4, a final frame's type and length at 0..4.
    writer = _Writer(sink, _FINAL_HEAD + size + TAG_BYTES, _in_flight(size))
    try:
        total = _seal_frames(aead, header, first, source, writer, max_bytes, progress)
    except BaseException:
        writer.abandon()
        raise
    writer.finish()
    return total


def _seal_frames(
    aead: AESGCM,
    header: Header,
    first: bytes,
    source: BinaryIO,
    writer: _Writer,
    max_bytes: int | None,
    progress: Progress | None,
) -> int:
    size, mid = header.frame_size, header.message_id
    # Two plaintext buffers, used in turn: the frame being sealed and the one read ahead.
    ahead = (bytearray(size), bytearray(size))
    current = memoryview(first)
    number, total, spare = 1, 0, 0
    while True:
        following = memoryview(b"")
        if len(current) == size:
            into = memoryview(ahead[spare])
            following = into[: _fill(source, into)]
            spare ^= 1
        length = len(current)
        total += length
        _check_count(number, total, max_bytes)
        final = not following
        out = writer.take()
        end = _FINAL_HEAD + length + TAG_BYTES
        aad = frame_aad(mid, number, final, length)
        aead.encrypt_into(frame_nonce(number), current, aad, memoryview(out)[_FINAL_HEAD:end])
        if final:
            struct.pack_into(">BI", out, 0, FRAME_FINAL, length)
            writer.put(out, 0, end)
        else:
            out[_FINAL_HEAD - 1] = FRAME_REGULAR
            writer.put(out, _FINAL_HEAD - 1, end)
        if progress is not None:
            progress(length)
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
    """Verify and decrypt the frames of ``source`` to ``sink``; return the plaintext length.

    Each frame is one read: a regular frame is exactly ``1 + frame_size + 16`` bytes; a final
    frame is at most 4 bytes longer, and anything a read brings beyond its end is data after
    the final frame (refused).
    """
    writer = _Writer(sink, header.frame_size, _in_flight(header.frame_size))
    try:
        total = _open_frames(AESGCM(frame_key), header, source, sink, writer, progress)
    except BaseException:
        writer.abandon()
        raise
    writer.finish()
    return total


def _open_frames(
    aead: AESGCM,
    header: Header,
    source: BinaryIO,
    sink: BinaryIO,
    writer: _Writer,
    progress: Progress | None,
) -> int:
    size, mid = header.frame_size, header.message_id
    regular = 1 + size + TAG_BYTES
    # The first frame as a plain read: a one-frame message (small records) needs no buffers.
    frame = memoryview(read_exact(source, regular))
    got = len(frame)
    inbuf: bytearray | None = None
    number, total = 1, 0
    while True:
        final, start, length = _frame_layout(frame, got, number, size)
        end = start + length + TAG_BYTES
        if got < end and got == regular:  # a final frame longer than a regular one
            frame, got = _read_rest(source, frame, got, end)
        if got < end:  # the stream ended (every read above asked for more)
            raise TruncatedMessage(f"the message is truncated inside frame {number}")
        ciphertext = frame[start:end]
        nonce, aad = frame_nonce(number), frame_aad(mid, number, final, length)
        if number == 1 and final:
            try:
                plain = aead.decrypt(nonce, ciphertext, aad)
            except InvalidTag:
                raise _frame_failed(number) from None
            write_all(sink, plain)
        else:
            out = writer.take()
            view = memoryview(out)[:length]
            try:
                aead.decrypt_into(nonce, ciphertext, aad, view)
            except InvalidTag:
                # decrypt_into left unverified plaintext in our buffer: wipe it; it never
                # reaches the sink.
                view[:] = bytes(length)
                raise _frame_failed(number) from None
            writer.put(out, 0, length)
        total += length
        if progress is not None:
            progress(length)
        if final:
            if got > end or source.read(1):
                raise MalformedMessage("data follows the final frame")
            return total
        number += 1
        if inbuf is None:
            inbuf = bytearray(regular + _FINAL_HEAD - 1)
        frame = memoryview(inbuf)
        got = _fill(source, frame[:regular])


def _frame_layout(frame: memoryview, got: int, number: int, size: int) -> tuple[bool, int, int]:
    """(final, where the ciphertext starts, plaintext length) of the frame read into ``frame``."""
    if got == 0:
        raise TruncatedMessage(
            f"the message is truncated: it ends before its final frame (after {number - 1} frames)"
        )
    if number > MAX_FRAMES:
        raise MalformedMessage(f"more than {MAX_FRAMES} frames")
    if frame[0] == FRAME_REGULAR:
        return False, 1, size
    if frame[0] != FRAME_FINAL:
        raise MalformedMessage(f"frame {number} has an unknown type byte")
    if got < _FINAL_HEAD:
        raise TruncatedMessage("the message is truncated inside its final frame")
    (length,) = struct.unpack_from(">I", frame, 1)
    if length > size:
        raise TamperedMessage("the final frame claims more than a frame of plaintext")
    return True, _FINAL_HEAD, length


def _read_rest(source: BinaryIO, frame: memoryview, got: int, end: int) -> tuple[memoryview, int]:
    """Read the last (up to 4) bytes of a final frame longer than a regular one."""
    if len(frame) < end:
        wider = bytearray(end)
        wider[:got] = frame[:got]
        frame = memoryview(wider)
    return frame, got + _fill(source, frame[got:end])


def _frame_failed(number: int) -> TamperedMessage:
    return TamperedMessage(
        f"frame {number} failed authentication (changed, reordered, from another message, "
        "or marked final where it was not)"
    )
