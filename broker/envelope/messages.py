"""Whole ``kbe1`` messages through a key source: encrypt, decrypt and header rewrap.

Every data key comes from the broker (so its policy and audit see each one, with the
encryption context), unless a :class:`DataKeyCache` holds one within its limits.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import BinaryIO

from broker.envelope.cache import DataKeyCache, wipe
from broker.envelope.errors import (
    CommitmentMismatch,
    ContextMismatch,
    MalformedMessage,
    NoUsableKey,
    TamperedMessage,
)
from broker.envelope.format import (
    DATA_KEY_BYTES,
    DEFAULT_FRAME_SIZE,
    MESSAGE_ID_BYTES,
    ContextPairs,
    Header,
    canonical_context,
    check_frame_size,
    read_header,
    seal_header,
    verify_header,
)
from broker.envelope.keysource import KeySource
from broker.envelope.stream import Progress, open_body, seal_body, write_all
from broker.keys import ciphertext as kb1


def _key_list(keys: str | Sequence[str]) -> tuple[str, ...]:
    listed = (keys,) if isinstance(keys, str) else tuple(keys)
    if not listed:
        raise MalformedMessage("name at least one key to wrap the data key under")
    if len(set(listed)) != len(listed):
        raise MalformedMessage("a key is named twice")
    return listed


def check_context(header: Header, expected: ContextPairs) -> None:
    """Refuse a message sealed under another context, naming only the fields (values may be secret)."""
    if header.context == expected:
        return
    got, want = dict(header.context), dict(expected)
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    raise ContextMismatch(
        "the message was sealed under a different encryption context (fields that differ: "
        + ", ".join(repr(k) for k in differ)
        + ")"
    )


def refused_for_this_key(exc: Exception) -> bool:
    """Whether a key source's error is the broker's answer about this one key (a 4xx problem:
    denied, not found, wrong state or context), as opposed to no answer (status 0), a 5xx, a
    rate limit or a bug — which no other wrapped key would fix."""
    status = getattr(exc, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status != 429


class Envelope:
    """Streaming envelope encryption of any size through keybroker.

    ``keys`` is anything with the :class:`KeySource` methods (``broker.sdk.Client`` or a
    :class:`CountingKeySource`). Memory stays at about two frames whatever the message size.
    """

    def __init__(
        self,
        keys: KeySource,
        *,
        cache: DataKeyCache | None = None,
        frame_size: int = DEFAULT_FRAME_SIZE,
    ) -> None:
        check_frame_size(frame_size)
        self.keys = keys
        self.cache = cache
        self.frame_size = frame_size

    # -- encrypt ----------------------------------------------------------------------------

    def encrypt(
        self,
        key: str | Sequence[str],
        source: BinaryIO,
        sink: BinaryIO,
        context: Mapping[str, str] | None = None,
        *,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> Header:
        """Seal ``source`` into ``sink`` under a data key wrapped by every key named, in order.

        The first key makes the data key; each further key gets it by a broker rewrap (the
        data key never goes back to the broker). With a cache, a message of declared ``size``
        may reuse a cached data key; one of unknown size always gets a fresh one.
        """
        keys, pairs = _key_list(key), canonical_context(context)
        data_key, wrapped = self._data_key(keys, pairs, size)
        try:
            header = seal_header(data_key, wrapped, pairs, self.frame_size, os.urandom(MESSAGE_ID_BYTES))
            frame_key = verify_header(header, data_key)
        finally:
            wipe(data_key)
        write_all(sink, header.encode())
        seal_body(header, frame_key, source, sink, max_bytes=size, progress=progress)
        return header

    def _data_key(
        self, keys: tuple[str, ...], pairs: ContextPairs, size: int | None
    ) -> tuple[bytearray, tuple[str, ...]]:
        if self.cache is not None and size is not None:
            found = self.cache.take_for_encrypt(keys, pairs, size)
            if found is not None:
                return found
        context = dict(pairs)
        made = self.keys.generate_data_key(keys[0], context, size=DATA_KEY_BYTES)
        if len(made.plaintext) != DATA_KEY_BYTES:
            raise MalformedMessage("the key source returned a data key that is not 32 bytes")
        wrapped = [made.ciphertext]
        for other in keys[1:]:
            wrapped.append(self.keys.rewrap(keys[0], made.ciphertext, context, to_key=other).ciphertext)
        if self.cache is not None and size is not None:
            self.cache.put_for_encrypt(keys, pairs, made.plaintext, tuple(wrapped), size)
        return bytearray(made.plaintext), tuple(wrapped)

    def encrypt_bytes(
        self, key: str | Sequence[str], data: bytes, context: Mapping[str, str] | None = None
    ) -> bytes:
        out = io.BytesIO()
        self.encrypt(key, io.BytesIO(data), out, context, size=len(data))
        return out.getvalue()

    # -- decrypt ----------------------------------------------------------------------------

    def decrypt(
        self,
        source: BinaryIO,
        sink: BinaryIO,
        context: Mapping[str, str] | None = None,
        *,
        progress: Progress | None = None,
    ) -> Header:
        """Verify and open a message; ``context`` must equal the one it was sealed under.

        The wrapped data keys are tried in header order; the first the caller may unwrap is
        used. Plaintext already written when an error is raised must be discarded.
        """
        header = read_header(source)
        pairs = canonical_context(context)
        check_context(header, pairs)
        frame_key, used = self._open_header(header, pairs)
        length = open_body(header, frame_key, source, sink, progress=progress)
        if self.cache is not None:
            self.cache.charge_decrypt(used, pairs, length)
        return header

    def _open_header(self, header: Header, pairs: ContextPairs) -> tuple[bytes, str]:
        """The frame key, from the first wrapping the caller may unwrap whose data key the
        header commits to, and that wrapping.

        A wrapping that unwraps to another data key (a valid wrapping of another message's
        key swapped into the list: the wrapped keys are outside the header tag) is skipped
        like a refused one, so an edited list cannot hide the wrappings that still open the
        message; if one was found and nothing else opened, that is reported as tampering.
        """
        reasons: list[tuple[str, str]] = []
        mismatch: TamperedMessage | None = None
        for wrapped in header.wrapped:
            data_key = self._unwrap_one(header, wrapped, pairs, reasons)
            if data_key is None:
                continue
            try:
                return verify_header(header, data_key), wrapped
            except CommitmentMismatch as exc:
                mismatch = exc
                reasons.append((kb1.decode(wrapped).key, str(exc)))
            finally:
                wipe(data_key)
        if mismatch is not None:
            raise TamperedMessage(
                "the data key does not match the header's key commitment ("
                + "; ".join(f"{key}: {why}" for key, why in reasons)
                + ")"
            )
        raise NoUsableKey(reasons)

    def _unwrap_one(
        self, header: Header, wrapped: str, pairs: ContextPairs, reasons: list[tuple[str, str]]
    ) -> bytearray | None:
        if self.cache is not None:
            cached = self.cache.take_for_decrypt(wrapped, pairs)
            if cached is not None:
                return cached
        name = kb1.decode(wrapped).key
        try:
            data_key = self.keys.decrypt(name, wrapped, dict(pairs))
        # The broker refusing this key (denied, revoked, wrong context) means "try the next
        # one"; all failing is reported with each reason. An unreachable broker or a bug is
        # not a refusal: it propagates as itself.
        except Exception as exc:
            if not refused_for_this_key(exc):
                raise
            reasons.append((name, str(exc) or exc.__class__.__name__))
            return None
        if self.cache is not None:
            self.cache.put_for_decrypt(wrapped, pairs, data_key)
        return bytearray(data_key)

    def decrypt_bytes(self, data: bytes, context: Mapping[str, str] | None = None) -> bytes:
        out = io.BytesIO()
        self.decrypt(io.BytesIO(data), out, context)
        return out.getvalue()

    # -- header rewrap ----------------------------------------------------------------------

    def rewrap(
        self,
        source: BinaryIO,
        sink: BinaryIO,
        context: Mapping[str, str] | None = None,
        *,
        to_keys: Sequence[str] | None = None,
        drop_keys: Sequence[str] = (),
        progress: Progress | None = None,
    ) -> Header:
        """Copy a message with its data key re-wrapped; the body is copied byte for byte.

        Without ``to_keys`` each wrapped key moves to its key's latest version (every one must
        succeed). With ``to_keys`` the data key is wrapped under each of those keys (any
        backend), made from the first wrapping that proves to hold the message's data key;
        the message's wrappings under other keys are kept as they are (an escrow key the
        caller may not use is never lost) unless their key is in ``drop_keys``.

        Nothing is written until the new header is proven to open the body: a new wrapping is
        unwrapped through the broker and its data key checked against the header's key
        commitment and tag. A header that cannot be proven is refused (the caller's file
        stays as it was) — an in-place rewrap never turns an openable file into an
        unopenable one.
        """
        header = read_header(source)
        pairs = canonical_context(context)
        check_context(header, pairs)
        ctx = dict(pairs)
        drop = set(drop_keys)
        if to_keys is None:
            kept = [w for w in header.wrapped if kb1.decode(w).key not in drop]
            if not kept:
                raise MalformedMessage("every wrapping would be dropped; the message could not be opened")
            wrapped = [self.keys.rewrap(kb1.decode(w).key, w, ctx).ciphertext for w in kept]
            self._prove(header, wrapped, ctx)
        else:
            targets = _key_list(to_keys)
            if drop & set(targets):
                raise MalformedMessage("a key is both a target and dropped")
            made = self._rewrap_to(header, targets, ctx)
            kept = [
                w
                for w in header.wrapped
                if kb1.decode(w).key not in drop and kb1.decode(w).key not in targets
            ]
            wrapped = made + kept
        new = header.with_wrapped(wrapped)
        write_all(sink, new.encode())
        _copy(source, sink, progress)
        return new

    def _rewrap_to(self, header: Header, targets: tuple[str, ...], ctx: dict[str, str]) -> list[str]:
        """Wrappings of the message's data key under each target, from the first existing
        wrapping whose rewrap under the first target proves to open the header."""
        reasons: list[tuple[str, str]] = []
        mismatch = False
        for candidate in header.wrapped:
            name = kb1.decode(candidate).key
            try:
                first = self.keys.rewrap(name, candidate, ctx, to_key=targets[0]).ciphertext
            # As in decrypt: a key the caller may not use sends it to the next wrapping.
            except Exception as exc:
                if not refused_for_this_key(exc):
                    raise
                reasons.append((name, str(exc) or exc.__class__.__name__))
                continue
            try:
                self._prove(header, [first, candidate], ctx)
            except CommitmentMismatch:
                # A wrapping of another data key swapped into the list: never build on it.
                mismatch = True
                reasons.append((name, "its data key does not match the header's key commitment"))
                continue
            return [first] + [
                self.keys.rewrap(targets[0], first, ctx, to_key=t).ciphertext for t in targets[1:]
            ]
        if mismatch:
            raise TamperedMessage(
                "no wrapping could be re-wrapped to a header that opens the message; the message is "
                "unchanged (" + "; ".join(f"{key}: {why}" for key, why in reasons) + ")"
            )
        raise NoUsableKey(reasons)

    def _prove(self, header: Header, wrapped: Sequence[str], ctx: dict[str, str]) -> None:
        """Check that one of ``wrapped`` opens ``header``: unwrap each the caller may unwrap, in
        order, until one's data key passes the key commitment and the header tag. Raises
        :class:`CommitmentMismatch` if those unwrapped all hold other data keys, and
        :class:`NoUsableKey` if none could be unwrapped (nothing proves the message opens)."""
        reasons: list[tuple[str, str]] = []
        mismatched = False
        for text in wrapped:
            name = kb1.decode(text).key
            try:
                data_key = bytearray(self.keys.decrypt(name, text, ctx))
            except Exception as exc:
                if not refused_for_this_key(exc):
                    raise
                reasons.append((name, str(exc) or exc.__class__.__name__))
                continue
            try:
                verify_header(header, data_key)
            except CommitmentMismatch as exc:
                mismatched = True
                reasons.append((name, str(exc)))
                continue
            finally:
                wipe(data_key)
            return
        listed = "; ".join(f"{key}: {why}" for key, why in reasons)
        if mismatched:
            raise CommitmentMismatch(f"the re-wrapped data key does not open the message ({listed})")
        raise NoUsableKey(
            [*reasons, ("proof", "no new wrapping could be unwrapped to prove the message still opens")]
        )


def _copy(source: BinaryIO, sink: BinaryIO, progress: Progress | None) -> None:
    while True:
        chunk = source.read(1024 * 1024)
        if chunk is None:  # a non-blocking source with nothing yet: not the end of the body
            raise MalformedMessage("the source is non-blocking; kbe1 streams need a blocking reader")
        if not chunk:
            return
        write_all(sink, chunk)
        if progress is not None:
            progress(len(chunk))


# -- the raw-key path: no broker (test vectors, other implementations' checks) ---------------


def seal_with_data_key(
    data_key: bytes,
    wrapped: Sequence[str],
    source: BinaryIO,
    sink: BinaryIO,
    context: Mapping[str, str] | None = None,
    *,
    frame_size: int = DEFAULT_FRAME_SIZE,
    message_id: bytes | None = None,
) -> Header:
    """Seal with a data key the caller holds; ``message_id`` fixed only to reproduce test vectors."""
    header = seal_header(
        data_key, wrapped, canonical_context(context), frame_size, message_id or os.urandom(MESSAGE_ID_BYTES)
    )
    write_all(sink, header.encode())
    seal_body(header, verify_header(header, data_key), source, sink)
    return header


def open_with_data_key(
    data_key: bytes, source: BinaryIO, sink: BinaryIO, context: Mapping[str, str] | None = None
) -> Header:
    """Open a message with its data key in hand (no broker call); same checks as :meth:`Envelope.decrypt`."""
    header = read_header(source)
    check_context(header, canonical_context(context))
    open_body(header, verify_header(header, data_key), source, sink)
    return header
