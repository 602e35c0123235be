"""The one seam between the broker and a key store: bytes in, bytes out.

Every backend (Vault transit, AWS KMS, a PKCS#11 HSM) implements
:class:`KeyBackend`. No SDK type crosses this seam: a backend translates its SDK's
failures into :mod:`broker.errors` at the boundary, and raises
:class:`~broker.errors.UnsupportedOperation` for what its product or the key's
type cannot do.

A logical key has versions; each version is backed by one piece of backend
material named by an opaque *material reference* the backend returns when it
creates the version (a transit version number, a KMS key id, a PKCS#11 object
id). The broker stores references in its registry and hands them back on every
call, so a backend never has to know the broker's version numbers.

The encryption context reaches a backend as the caller's flat string map; a
backend binds it natively (KMS ``EncryptionContext``) or as AAD in the
canonical form :func:`canonical_context` gives (Vault ``associated_data``,
AES-GCM AAD in the HSM).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from broker.errors import BrokerError
from broker.vocab import Backend, KeyType

T = TypeVar("T")


@dataclass(frozen=True)
class KeyRef:
    """What a backend needs to know about a logical key: its name and type."""

    name: str
    type: KeyType


Context = Mapping[str, str]


def canonical_context(context: Context) -> bytes:
    """The context as AAD: sorted-key compact JSON, UTF-8; an empty context is empty AAD."""
    if not context:
        return b""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


async def each(calls: Sequence[Awaitable[T]]) -> list[T | BrokerError]:
    """Run calls concurrently; a call's broker error becomes its result instead of failing the rest."""

    async def one(call: Awaitable[T]) -> T | BrokerError:
        try:
            return await call
        except BrokerError as exc:
            return exc

    return list(await asyncio.gather(*(one(c) for c in calls)))


class KeyBackend(Protocol):
    """A key store. ``ref`` arguments are material references this backend returned."""

    name: Backend
    key_types: frozenset[KeyType]
    # Whether material holds the key's name in the backend (transit: a key named like it), so
    # material made late by a creation whose outcome was unknown would take the name.
    material_takes_name: bool

    async def create_key(self, key: KeyRef) -> str:
        """Create a new key's first material and return its reference.

        Refuses (:class:`Conflict`) material that already exists under the key's name: the
        broker never adopts a key it did not make (its type, export or backup settings could
        be anyone's).
        """
        ...

    async def finish_create(self, key: KeyRef, since: datetime) -> str:
        """Finish a creation whose outcome was unknown (the backend took it, no answer came in
        time; the reservation dates from ``since``): the material the backend made for it late,
        if the backend can tell it is the broker's, else new material. Refuses (:class:`Conflict`)
        what :meth:`create_key` refuses.
        """
        ...

    async def create_version(self, key: KeyRef) -> str:
        """Create new material for an existing key (a rotation) and return its reference."""
        ...

    async def encrypt(self, key: KeyRef, ref: str, plaintext: bytes, context: Context) -> bytes:
        """Encrypt under one version; the returned payload is opaque to the broker."""
        ...

    async def decrypt(self, key: KeyRef, ref: str, payload: bytes, context: Context) -> bytes:
        """Decrypt a payload of this version; any failure is :class:`DecryptionFailed`."""
        ...

    async def encrypt_batch(
        self, key: KeyRef, ref: str, items: Sequence[tuple[bytes, Context]]
    ) -> list[bytes | BrokerError]:
        """Encrypt many (plaintext, context) items under one version; an item's failure is its result."""
        ...

    async def decrypt_batch(
        self, key: KeyRef, items: Sequence[tuple[str, bytes, Context]]
    ) -> list[bytes | BrokerError]:
        """Decrypt many (ref, payload, context) items; an item's failure is its result."""
        ...

    async def reencrypt(
        self, key: KeyRef, src_ref: str, dst_ref: str, payload: bytes, context: Context
    ) -> bytes:
        """Move a payload from one version to another without returning the plaintext."""
        ...

    async def data_key(self, key: KeyRef, ref: str, nbytes: int, context: Context) -> tuple[bytes, bytes]:
        """A fresh random data key of ``nbytes``: ``(plaintext, payload encrypting it)``."""
        ...

    async def sign(self, key: KeyRef, ref: str, digest: bytes) -> bytes:
        """Sign a SHA-256 digest; the signature is DER (ASN.1 ``ECDSA-Sig-Value``)."""
        ...

    async def verify(self, key: KeyRef, ref: str, digest: bytes, signature: bytes) -> bool:
        """Whether ``signature`` (DER) is valid for ``digest``; malformed is simply invalid."""
        ...

    async def set_enabled(self, key: KeyRef, refs: Sequence[str], enabled: bool) -> None:
        """Mirror suspend/resume into the backend where it has such a switch (KMS)."""
        ...

    async def set_min_decryption(self, key: KeyRef, refs: Sequence[str]) -> None:
        """Mirror ``min_decrypt_version`` where native (transit): ``refs`` are the versions still allowed."""
        ...

    async def schedule_destruction(self, key: KeyRef, refs: Sequence[str], pending_days: int) -> None:
        """Start the backend's own deletion window where it has one (KMS)."""
        ...

    async def cancel_destruction(self, key: KeyRef, refs: Sequence[str]) -> None:
        """Undo :meth:`schedule_destruction`."""
        ...

    async def destroy(self, key: KeyRef, refs: Sequence[str]) -> None:
        """Remove the material for good (the window has passed). Idempotent."""
        ...


class PerItemBatches:
    """Batches for a backend without a batch API: the items run concurrently, failing alone."""

    async def encrypt(self, key: KeyRef, ref: str, plaintext: bytes, context: Context) -> bytes:
        raise NotImplementedError

    async def decrypt(self, key: KeyRef, ref: str, payload: bytes, context: Context) -> bytes:
        raise NotImplementedError

    async def encrypt_batch(
        self, key: KeyRef, ref: str, items: Sequence[tuple[bytes, Context]]
    ) -> list[bytes | BrokerError]:
        return await each([self.encrypt(key, ref, plaintext, context) for plaintext, context in items])

    async def decrypt_batch(
        self, key: KeyRef, items: Sequence[tuple[str, bytes, Context]]
    ) -> list[bytes | BrokerError]:
        return await each([self.decrypt(key, ref, payload, context) for ref, payload, context in items])
