"""Keys in Vault's transit engine, over the broker's authenticated :class:`VaultClient`."""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.backends._coalesce import Coalescer
from broker.backends.base import Context, KeyRef, canonical_context
from broker.backends.vault.client import BACKEND, VaultClient, vault_path
from broker.errors import (
    BadGateway,
    BrokerError,
    Conflict,
    DecryptionFailed,
    NotFound,
    Unavailable,
    UnsupportedOperation,
)
from broker.timeutil import parse_time
from broker.vocab import Backend, KeyType


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _transit_ciphertext(ref: str, payload: bytes) -> str:
    return f"vault:v{ref}:{_b64(payload)}"


def _transit_payload(ciphertext: str) -> bytes:
    # "vault:v<N>:<base64>": the version lives in the broker's ciphertext, so only the bytes are kept.
    prefix, _, encoded = ciphertext.rpartition(":")
    if not prefix.startswith("vault:v"):
        raise BadGateway("vault: transit answered an unexpected ciphertext format", backend=BACKEND)
    return base64.b64decode(encoded)


_SQUATTED = (
    "transit already holds a key named {name} that the broker did not create; it is not adopted "
    "(its settings and copies could be anyone's). Choose another name, or have a Vault operator "
    "find out who made it"
)
_TRANSIT_TYPES = {KeyType.AES256_GCM: "aes256-gcm96", KeyType.ECDSA_P256: "ecdsa-p256"}
# Vault's clock and the broker's may differ this much when a late-made key's time is compared.
_CLOCK_SLACK = timedelta(seconds=5)


def _version_one_time(info: dict[str, Any]) -> datetime | None:
    """When transit made version 1: ``keys`` maps versions to a Unix time (symmetric keys) or to
    an object with an RFC 3339 ``creation_time`` (asymmetric ones); None if unreadable."""
    keys = info.get("keys")
    first = keys.get("1") if isinstance(keys, dict) else None
    if isinstance(first, int) and not isinstance(first, bool):
        return datetime.fromtimestamp(first, UTC)
    created = first.get("creation_time") if isinstance(first, dict) else None
    if not isinstance(created, str):
        return None
    try:
        return parse_time(created)
    except ValueError:
        return None


_DATAKEY_BITS = {16: 128, 32: 256, 64: 512}
_ROTATE_ATTEMPTS = 100


def _batch_results(out: dict[str, Any], expected: int) -> list[dict[str, Any]]:
    results = (out.get("data") or {}).get("batch_results")
    if not isinstance(results, list) or len(results) != expected:
        raise BadGateway("vault: transit answered a batch with the wrong number of results", backend=BACKEND)
    return [r if isinstance(r, dict) else {} for r in results]


def _only(results: list[bytes | BrokerError]) -> bytes:
    result = results[0]
    if isinstance(result, BrokerError):
        raise result
    return result


class VaultTransit:
    """Keys in Vault's transit engine. A material reference is the transit version number.

    Versions are native: a rotation is a transit rotation. The context is sent as
    ``associated_data`` (AES-GCM AAD); the broker always names the version so its
    registry, not transit's "latest", decides which version encrypts.
    """

    name = Backend.VAULT
    key_types = frozenset(_TRANSIT_TYPES)
    material_takes_name = True  # the transit key is named like the broker's key

    def __init__(self, client: VaultClient, mount: str, *, coalesce: bool = True) -> None:
        self._client = client
        self._mount = mount
        self._rotation_locks: dict[str, asyncio.Lock] = {}
        self._encrypts: Coalescer[tuple[KeyRef, str], tuple[bytes, Context], bytes] = Coalescer(
            lambda target, items: self.encrypt_batch(target[0], target[1], items)
        )
        self._decrypts: Coalescer[KeyRef, tuple[str, bytes, Context], bytes] = Coalescer(self.decrypt_batch)
        self._coalesce = coalesce

    def _path(self, endpoint: str, name: str, *more: str) -> str:
        """``<mount>/<endpoint>/<key name>[/more]``, the name encoded as one segment."""
        return vault_path(f"{self._mount}/{endpoint}", name, *more)

    async def create_key(self, key: KeyRef) -> str:
        """Create the transit key; never adopt one that exists (someone else's settings and copies)."""
        path = self._path("keys", key.name)
        try:
            await self._client.request("GET", path, what="transit read key")
        except NotFound:
            pass
        else:
            raise Conflict(_SQUATTED.format(name=key.name))
        return await self._create(key, path)

    async def finish_create(self, key: KeyRef, since: datetime) -> str:
        """A creation whose outcome was unknown (Vault took the create and did not answer in
        time) is finished: a transit key made since the reservation, with exactly the settings
        the broker asks for and one version, is the one Vault made late and is kept; no key
        yet, it is made now; anything else is not the broker's (409, as in :meth:`create_key`).
        """
        path = self._path("keys", key.name)
        try:
            found = await self._client.request("GET", path, what="transit read key")
        except NotFound:
            return await self._create(key, path)
        info = found.get("data") or {}
        made_at = _version_one_time(info)
        if not self._is_as_asked(key, info) or made_at is None or made_at < since - _CLOCK_SLACK:
            raise Conflict(_SQUATTED.format(name=key.name))
        return "1"

    async def _create(self, key: KeyRef, path: str) -> str:
        wanted = self._asked(key)
        created = await self._client.request("POST", path, wanted, what="transit create key")
        # Transit's create is an upsert that only warns when the key existed: someone won a race.
        if any("already exist" in str(w) for w in created.get("warnings") or ()):
            raise Conflict(_SQUATTED.format(name=key.name))
        # The read is the authority on what was made (creation answers 204 on some versions).
        info = (await self._client.request("GET", path, what="transit read key")).get("data") or {}
        if not self._is_as_asked(key, info):
            raise Conflict(_SQUATTED.format(name=key.name))
        return "1"

    @staticmethod
    def _asked(key: KeyRef) -> dict[str, Any]:
        return {"type": _TRANSIT_TYPES[key.type], "exportable": False, "allow_plaintext_backup": False}

    @classmethod
    def _is_as_asked(cls, key: KeyRef, info: dict[str, Any]) -> bool:
        made = {k: info.get(k) for k in ("type", "exportable", "allow_plaintext_backup")}
        return (
            made == cls._asked(key)
            and info.get("latest_version") == 1
            and info.get("min_decryption_version") in (1, None)
        )

    async def create_version(self, key: KeyRef) -> str:
        # One rotation of a key at a time from this replica; other replicas are handled below.
        lock = self._rotation_locks.setdefault(key.name, asyncio.Lock())
        async with lock:
            data = await self._rotate(self._path("keys", key.name, "rotate"))
        return str(data["latest_version"])

    async def _rotate(self, path: str) -> dict[str, Any]:
        # OpenBao commits storage transactions optimistically: two rotations of one key at
        # the same moment (from two replicas) make one fail with "transaction commit
        # failed" and nothing written, so retrying it is safe.
        for attempt in range(_ROTATE_ATTEMPTS):
            try:
                rotated = await self._client.request("POST", path, {}, what="transit rotate")
            except BadGateway as exc:
                if exc.says(500, "transaction commit failed"):
                    await asyncio.sleep(random.uniform(0, min(0.005 * (attempt + 1), 0.1)))  # noqa: S311
                    continue
                raise
            data: dict[str, Any] = rotated.get("data") or {}
            return data
        raise Unavailable(
            f"vault: transit rotate kept conflicting ({_ROTATE_ATTEMPTS} attempts)", backend=BACKEND
        )

    async def encrypt(self, key: KeyRef, ref: str, plaintext: bytes, context: Context) -> bytes:
        """Concurrent encryptions under one key version share a transit batch_input call."""
        if not self._coalesce:
            return _only(await self.encrypt_batch(key, ref, [(plaintext, context)]))
        return await self._encrypts.submit((key, ref), (plaintext, context))

    async def decrypt(self, key: KeyRef, ref: str, payload: bytes, context: Context) -> bytes:
        """Concurrent decryptions with one key share a transit batch_input call."""
        if not self._coalesce:
            return _only(await self.decrypt_batch(key, [(ref, payload, context)]))
        return await self._decrypts.submit(key, (ref, payload, context))

    async def encrypt_batch(
        self, key: KeyRef, ref: str, items: Sequence[tuple[bytes, Context]]
    ) -> list[bytes | BrokerError]:
        batch = []
        for plaintext, context in items:
            entry: dict[str, Any] = {"plaintext": _b64(plaintext), "key_version": int(ref)}
            aad = canonical_context(context)
            if aad:
                entry["associated_data"] = _b64(aad)
            batch.append(entry)
        out = await self._client.request(
            "POST",
            self._path("encrypt", key.name),
            # A partial failure would otherwise be a 400 for the whole batch.
            {"batch_input": batch, "partial_failure_response_code": 200},
            what="transit encrypt batch",
            repeatable=True,
        )
        results: list[bytes | BrokerError] = []
        for item in _batch_results(out, len(items)):
            if item.get("error") or not item.get("ciphertext"):
                results.append(BadGateway(f"vault: transit encrypt: {item.get('error')}", backend=BACKEND))
            else:
                results.append(_transit_payload(item["ciphertext"]))
        return results

    async def decrypt_batch(
        self, key: KeyRef, items: Sequence[tuple[str, bytes, Context]]
    ) -> list[bytes | BrokerError]:
        batch = []
        for ref, payload, context in items:
            entry: dict[str, Any] = {"ciphertext": _transit_ciphertext(ref, payload)}
            aad = canonical_context(context)
            if aad:
                entry["associated_data"] = _b64(aad)
            batch.append(entry)
        try:
            out = await self._client.request(
                "POST",
                self._path("decrypt", key.name),
                {"batch_input": batch, "partial_failure_response_code": 200},
                what="transit decrypt batch",
                repeatable=True,
            )
        except BadGateway as exc:
            # Transit still answers 400 when every item failed; each was a decryption failure.
            if exc.upstream_status == 400:
                return [DecryptionFailed() for _ in items]
            raise
        results: list[bytes | BrokerError] = []
        for item in _batch_results(out, len(items)):
            if item.get("error") or "plaintext" not in item:
                results.append(DecryptionFailed())
            else:
                results.append(base64.b64decode(item["plaintext"]))
        return results

    async def reencrypt(
        self, key: KeyRef, src_ref: str, dst_ref: str, payload: bytes, context: Context
    ) -> bytes:
        if canonical_context(context):
            # Transit's rewrap takes no associated_data: with a context the broker
            # decrypts and encrypts itself; the plaintext stays in this process.
            plaintext = await self.decrypt(key, src_ref, payload, context)
            return await self.encrypt(key, dst_ref, plaintext, context)
        body = {"ciphertext": _transit_ciphertext(src_ref, payload), "key_version": int(dst_ref)}
        try:
            out = await self._client.request(
                "POST", self._path("rewrap", key.name), body, what="transit rewrap", repeatable=True
            )
        except BadGateway as exc:
            if exc.upstream_status == 400:
                raise DecryptionFailed() from exc
            raise
        return _transit_payload(out["data"]["ciphertext"])

    async def data_key(self, key: KeyRef, ref: str, nbytes: int, context: Context) -> tuple[bytes, bytes]:
        if nbytes not in _DATAKEY_BITS:
            raise UnsupportedOperation(f"vault: data keys are 16, 32 or 64 bytes, not {nbytes}")
        body: dict[str, Any] = {"bits": _DATAKEY_BITS[nbytes], "key_version": int(ref)}
        aad = canonical_context(context)
        if aad:
            body["associated_data"] = _b64(aad)
        out = await self._client.request(
            "POST",
            vault_path(f"{self._mount}/datakey/plaintext", key.name),
            body,
            what="transit datakey",
            repeatable=True,
        )
        data = out["data"]
        return base64.b64decode(data["plaintext"]), _transit_payload(data["ciphertext"])

    async def sign(self, key: KeyRef, ref: str, digest: bytes) -> bytes:
        body = {
            "input": _b64(digest),
            "prehashed": True,
            "hash_algorithm": "sha2-256",
            "key_version": int(ref),
            "marshaling_algorithm": "asn1",
        }
        out = await self._client.request(
            "POST", self._path("sign", key.name), body, what="transit sign", repeatable=True
        )
        return _transit_payload(out["data"]["signature"])

    async def verify(self, key: KeyRef, ref: str, digest: bytes, signature: bytes) -> bool:
        body = {
            "input": _b64(digest),
            "prehashed": True,
            "hash_algorithm": "sha2-256",
            "signature": _transit_ciphertext(ref, signature),
            "marshaling_algorithm": "asn1",
        }
        try:
            out = await self._client.request(
                "POST", self._path("verify", key.name), body, what="transit verify", repeatable=True
            )
        except BadGateway as exc:
            if exc.upstream_status == 400:  # a malformed signature is an invalid one
                return False
            raise
        return bool(out["data"]["valid"])

    async def set_enabled(self, key: KeyRef, refs: Sequence[str], enabled: bool) -> None:
        # Transit has no disable switch; the broker refuses operations on a suspended key itself.
        return None

    async def set_min_decryption(self, key: KeyRef, refs: Sequence[str]) -> None:
        if not refs:
            return
        await self._client.request(
            "POST",
            self._path("keys", key.name, "config"),
            {"min_decryption_version": min(int(r) for r in refs)},
            what="transit config",
            repeatable=True,
        )

    async def schedule_destruction(self, key: KeyRef, refs: Sequence[str], pending_days: int) -> None:
        # Transit deletes at once; the broker keeps the window and calls destroy() when it ends.
        return None

    async def cancel_destruction(self, key: KeyRef, refs: Sequence[str]) -> None:
        return None

    async def destroy(self, key: KeyRef, refs: Sequence[str]) -> None:
        path = self._path("keys", key.name)
        try:
            await self._client.request(
                "POST",
                self._path("keys", key.name, "config"),
                {"deletion_allowed": True},
                what="transit config",
                repeatable=True,
            )
        except NotFound:
            return
        await self._client.request("DELETE", path, what="transit delete key")
