"""Key lifecycle and cryptographic operations, the same for every backend.

The broker enforces the state machine itself before any backend is asked (moto,
for one, lets a disabled KMS key encrypt), then mirrors what a backend can hold
natively: KMS enable/disable and deletion windows, transit's
``min_decryption_version``. Registry writes are check-and-set
(:class:`broker.state.registry.Registry`), so replicas never lose a change.

Time comes from an injected clock, so tests move through rotation periods and
destruction windows without sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from broker import periodic
from broker.backends.base import Context, KeyBackend, KeyRef
from broker.errors import BadRequest, BrokerError, Conflict, DecryptionFailed, NotFound, OutcomeUnknown
from broker.keys import ciphertext
from broker.keys.model import (
    MAX_ROTATION_SECONDS,
    MIN_ROTATION_SECONDS,
    Key,
    Op,
    State,
    Version,
    WorkClaim,
    check_name,
)
from broker.log import get_logger
from broker.state.registry import READ_CONCURRENCY, Registry
from broker.timeutil import iso, now_utc
from broker.vocab import ENVIRONMENTS, Backend, KeyType

log = get_logger(__name__)

# A paged listing reads at most this many entries per key it may return (see list_keys).
SCAN_PER_PAGE = 4
Clock = Callable[[], datetime]
DATAKEY_SIZES = (16, 32, 64)


@dataclass(frozen=True)
class NewKey:
    name: str
    backend: Backend
    type: KeyType
    environment: str
    rotation_period_seconds: int | None = None
    deletion_protection: bool = True
    tags: Mapping[str, str] | None = None
    description: str = ""


def check_rotation_period(seconds: int | None) -> None:
    if seconds is not None and seconds < MIN_ROTATION_SECONDS:
        raise BadRequest(f"rotation_period must be at least {MIN_ROTATION_SECONDS} seconds (1h)")
    if seconds is not None and seconds > MAX_ROTATION_SECONDS:
        raise BadRequest(f"rotation_period must be at most {MAX_ROTATION_SECONDS} seconds (100 years)")


@dataclass(frozen=True)
class Sealed:
    """What the broker hands back: its encoded envelope (of a ciphertext or a signature) and the version."""

    encoded: str
    version: int


class KeyService:
    def __init__(
        self,
        registry: Registry,
        backends: Mapping[Backend, KeyBackend],
        *,
        clock: Clock = now_utc,
        cache_seconds: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
        claim_seconds: float = 300.0,
        creation_lease_seconds: float = 60.0,
    ) -> None:
        self._registry = registry
        self._backends = dict(backends)
        self._clock = clock
        # Crypto requests read key metadata through a short cache (one Vault read saved per
        # request); a change through this replica updates it at once, through another replica
        # it holds here within cache_seconds. Lifecycle changes always read fresh.
        self._cache_seconds = cache_seconds
        self._monotonic = monotonic
        self._cache: dict[str, tuple[float, Key]] = {}
        # How long a replica's claim on scheduled work holds (keys.scheduler_claim_seconds).
        self._claim_seconds = claim_seconds
        # How long a creation may hold its name before another creation may take it over
        # (longer than a creation can take: its registry writes and backend call, deadlines included).
        self._creation_lease = creation_lease_seconds

    def now(self) -> datetime:
        return self._clock()

    def backend(self, key: Key) -> KeyBackend:
        return self._backends[key.backend]

    @staticmethod
    def ref(key: Key) -> KeyRef:
        return KeyRef(key.name, key.type)

    # -- reading ---------------------------------------------------------------------

    async def get(self, name: str) -> Key:
        """The key as Vault has it now."""
        return self._remember(await self._registry.get(name))

    async def cached(self, name: str) -> Key:
        """The key, from the cache when it is younger than ``cache_seconds``: for crypto requests."""
        hit = self._cache.get(check_name(name))
        if hit is not None and self._monotonic() - hit[0] < self._cache_seconds:
            return hit[1]
        return await self.get(name)

    def _remember(self, key: Key) -> Key:
        if self._cache_seconds > 0:
            self._cache[key.name] = (self._monotonic(), key)
        return key

    async def _update(self, name: str, change: Callable[[Key], Key]) -> Key:
        return self._remember(await self._registry.update(name, change))

    async def resolve(self, key: str | Key) -> Key:
        """A key already read (and authorized) by the caller is used as is: one Vault read per request."""
        return key if isinstance(key, Key) else await self.cached(key)

    async def list_keys(
        self,
        filters: Mapping[str, str] | None = None,
        *,
        after: str | None = None,
        limit: int | None = None,
        visible: Callable[[Key], Awaitable[bool]] | None = None,
    ) -> tuple[list[Key], str | None]:
        """Keys matching every filter (and ``visible``), in name order, from after ``after``.

        With ``limit``, at most that many and the cursor to continue from (None when none is
        left): a page costs one Vault listing and at most ``SCAN_PER_PAGE * limit`` reads,
        however many keys exist and however few of them match or are visible. A page cut by
        that bound can hold fewer keys than ``limit``, even none, with a cursor: the caller
        follows ``next`` until it is None.
        """
        f = dict(filters or {})
        tag = f.pop("tag", None)
        tname, _, tvalue = (tag or "").partition("=")
        out: list[Key] = []
        scanned = 0
        budget = None if limit is None else SCAN_PER_PAGE * limit
        last: str | None = None
        scan = self._registry.scan(after)
        try:
            async for key in scan:
                if limit is not None and len(out) >= limit:
                    # A key remains beyond a full page: the caller continues after the last one.
                    return out, out[-1].name
                if budget is not None and scanned >= budget:
                    # A caller who may see few keys must not make one request read the whole
                    # registry: the page ends here, the cursor after the last key read.
                    return out, last
                scanned += 1
                last = key.name
                row = key.to_json()
                if any(str(row.get(field)) != value for field, value in f.items()):
                    continue
                if tag is not None and (tname not in key.tags or (tvalue and key.tags[tname] != tvalue)):
                    continue
                if visible is not None and not await visible(key):
                    continue
                out.append(key)
        finally:
            await scan.aclose()
        return out, None

    # -- lifecycle ---------------------------------------------------------------------

    async def create(self, spec: NewKey, *, owner: str) -> Key:
        check_name(spec.name, "name")
        if spec.environment not in ENVIRONMENTS:
            raise BadRequest(f"environment must be one of {', '.join(ENVIRONMENTS)}")
        check_rotation_period(spec.rotation_period_seconds)
        backend = self._backends[spec.backend]
        if spec.type not in backend.key_types:
            supported = ", ".join(sorted(backend.key_types))
            raise BadRequest(f"backend {spec.backend} cannot hold {spec.type} keys (it can: {supported})")
        now = self.now()
        key = Key(
            name=spec.name,
            backend=spec.backend,
            type=spec.type,
            environment=spec.environment,
            state=State.PRE_ACTIVE,
            created_at=now,
            updated_at=now,
            rotation_period_seconds=spec.rotation_period_seconds,
            deletion_protection=spec.deletion_protection,
            tags=dict(spec.tags or {}),
            description=spec.description,
            owner=owner,
        )
        # Claim the name first: a second creator gets 409 before any material exists.
        unfinished: datetime | None = None
        try:
            await self._registry.create(key)
        except Conflict:
            key, unfinished = await self._take_over_unfinished(key)
        try:
            if unfinished is None:
                material = await backend.create_key(self.ref(key))
            else:
                material = await backend.finish_create(self.ref(key), unfinished)
        except OutcomeUnknown:
            if not backend.material_takes_name:
                await self._forget_reservation(key.name)  # late material, if any, names nothing
                raise
            # The backend may still make it, under the key's name: the reservation stays (else the
            # late transit key would squat the name for good), and creating the key again once
            # the reservation's lease has passed finishes the job (adopting what Vault made).
            log.warning("key_creation_unconfirmed", key=key.name, backend=str(key.backend))
            raise
        except BrokerError:
            await self._forget_reservation(key.name)
            raise
        version = Version(1, material, self.now())
        created = await self._update(key.name, lambda k: k.activated(version, self.now()))
        log.info("key_created", key=key.name, backend=str(key.backend), type=str(key.type))
        return created

    async def _take_over_unfinished(self, key: Key) -> tuple[Key, datetime]:
        """The name is taken: if by a creation that never finished (pre-active, no version, not
        touched for longer than any creation takes), this creation takes its reservation over
        (check-and-set, so one creator does) and returns it with the time it was first made.
        Otherwise the 409 says what holds the name."""
        now = self.now()

        def take(stored: Key) -> Key:
            if stored.state is not State.PRE_ACTIVE or stored.versions:
                raise Conflict(f"a key named {key.name!r} already exists")
            if (stored.backend, stored.type) != (key.backend, key.type):
                raise Conflict(
                    f"a creation of key {key.name!r} as {stored.type} on {stored.backend} did not "
                    "finish; create it again with that backend and type to finish it"
                )
            age = (now - stored.updated_at).total_seconds()
            if age < self._creation_lease:
                raise Conflict(
                    f"key {key.name!r} is being created (started {age:.0f} s ago); if that creation "
                    f"failed, create it again in {self._creation_lease - age:.0f} s to finish it"
                )
            # The caller's request decides everything but the backend and type (which the
            # material depends on); the first reservation's time bounds what may be adopted.
            return replace(key, created_at=stored.created_at, updated_at=now)

        try:
            taken = await self._registry.update(key.name, take)
        except NotFound:
            raise Conflict(f"a key named {key.name!r} was being created; try again") from None
        self._cache.pop(key.name, None)
        log.info("key_creation_resumed", key=key.name, since=iso(taken.created_at))
        return taken, taken.created_at

    async def _forget_reservation(self, name: str) -> None:
        """Free the name after a creation that made nothing; if Vault cannot be told, the
        reservation stays and a later creation of the same name takes it over."""
        self._cache.pop(name, None)
        try:
            await self._registry.delete(name)
        except BrokerError as exc:
            log.warning("key_reservation_left", key=name, error=exc.detail)

    async def rotate(self, name: str) -> Key:
        key = await self.get(name)
        if key.state is not State.ACTIVE:
            raise Conflict(f"key {name} is {key.state}: cannot rotate (allowed from: active)")
        material = await self.backend(key).create_version(self.ref(key))
        # The material exists now; the check-and-set loop appends it as the next version,
        # so concurrent rotations each add exactly one version and none is lost.
        rotated = await self._update(name, lambda k: k.with_version(material, self.now()))
        log.info("key_rotated", key=name, version=rotated.latest.number)
        return rotated

    async def rotate_if_due(self, name: str) -> Key | None:
        """Scheduled rotation, exactly once per due period across replicas.

        The replica whose claim (a check-and-set on the key's entry) wins makes the new
        material; the version and the new period are recorded only after the backend made
        it. A failed backend call gives the claim back, so the next tick (on any replica)
        tries again instead of the whole period being skipped.
        """
        owner, now = _claim_owner(), self.now()

        def due(k: Key) -> bool:
            return k.rotation_due(now)

        try:
            key = await self._claim(name, "rotate", owner, due)
        except _NotDue:
            return None
        try:
            material = await self.backend(key).create_version(self.ref(key))
        except BrokerError:
            await self._release(name, owner)
            raise

        def record(k: Key) -> Key:
            if k.work_claim is None or k.work_claim.owner != owner:
                raise _ClaimLost
            return replace(k.with_version(material, self.now()), work_claim=None)

        try:
            rotated = await self._update(name, record)
        except _ClaimLost:
            # Our lease ran out and another replica took the work over: recording this material
            # too would make two versions in one period. The handle (no secret) is logged for cleanup.
            log.warning("scheduled_rotation_superseded", key=name, unused_material=material)
            return None
        except BrokerError:
            await self._release(name, owner)
            raise
        log.info("key_rotated", key=name, version=rotated.latest.number, scheduled=True)
        return rotated

    async def _claim(self, name: str, work: str, owner: str, due: Callable[[Key], bool]) -> Key:
        """Take the key's work claim (check-and-set), or raise _NotDue when the work is not due
        or another replica's live claim holds it."""
        now = self.now()
        lease = timedelta(seconds=self._claim_seconds)
        until = now + lease

        def claim(k: Key) -> Key:
            # Replicas' clocks may differ a little; a lease beyond that was never a broker's.
            if not due(k) or k.claimed_by_other(now, owner, lease + _CLOCK_SKEW):
                raise _NotDue
            if k.work_claim is not None and k.work_claim.live(now) and k.work_claim.owner != owner:
                log.warning("scheduled_claim_replaced", key=name, reason="lease longer than any broker takes")
            return replace(k, work_claim=WorkClaim(work, owner, until))

        return await self._update(name, claim)

    async def _release(self, name: str, owner: str) -> None:
        """Give the claim back after failed work, so the next tick retries; best effort (it lapses anyway)."""

        def release(k: Key) -> Key:
            if k.work_claim is None or k.work_claim.owner != owner:
                return k
            return replace(k, work_claim=None)

        try:
            await self._update(name, release)
        except BrokerError as exc:
            log.warning("scheduled_claim_not_released", key=name, error=exc.detail)

    async def suspend(self, name: str) -> Key:
        key = await self._update(name, lambda k: k.suspended(self.now()))
        await self.backend(key).set_enabled(self.ref(key), [v.material for v in key.versions], False)
        return key

    async def resume(self, name: str) -> Key:
        key = await self.get(name)
        key.resumed(self.now())  # refuse before touching the backend
        await self.backend(key).set_enabled(self.ref(key), [v.material for v in key.versions], True)
        return await self._update(name, lambda k: k.resumed(self.now()))

    async def revoke(self, name: str, reason: str) -> Key:
        return await self._update(name, lambda k: k.revoked(reason, self.now()))

    async def patch(
        self, name: str, changes: dict[str, Any], *, guard: Callable[[Key, Key], None] | None = None
    ) -> Key:
        """Apply ``changes``; ``guard(before, after)`` may raise to refuse them.

        The guard sees the key as stored at the moment of the write (inside the
        check-and-set loop, again on every retry), so a decision about what the change
        does cannot be made on facts another writer has just replaced.
        """
        check_rotation_period(changes.get("rotation_period_seconds"))

        def change(before: Key) -> Key:
            after = before.patched(changes, self.now())
            if guard is not None:
                guard(before, after)
            return after

        key = await self._update(name, change)
        if "min_decrypt_version" in changes:
            allowed = [v.material for v in key.versions if v.number >= key.min_decrypt_version]
            await self.backend(key).set_min_decryption(self.ref(key), allowed)
        return key

    async def schedule_destruction(self, name: str, pending_days: int) -> Key:
        key = await self._update(name, lambda k: k.destruction_scheduled(pending_days, self.now()))
        await self.backend(key).schedule_destruction(
            self.ref(key), [v.material for v in key.versions], pending_days
        )
        log.info("key_destruction_scheduled", key=name, destroy_after=str(key.destroy_after))
        return key

    async def cancel_destruction(self, name: str) -> Key:
        key = await self.get(name)
        key.destruction_cancelled(self.now())
        await self.backend(key).cancel_destruction(self.ref(key), [v.material for v in key.versions])
        return await self._update(name, lambda k: k.destruction_cancelled(self.now()))

    async def destroy_if_due(self, name: str) -> Key | None:
        """End of the window: remove the backend material, then record ``destroyed``.

        Claimed like a scheduled rotation, so one replica removes the material; a failure
        gives the claim back and the next tick tries again.
        """
        owner, now = _claim_owner(), self.now()

        def due(k: Key) -> bool:
            return k.destruction_due(now)

        try:
            key = await self._claim(name, "destroy", owner, due)
        except _NotDue:
            return None
        try:
            await self.backend(key).destroy(self.ref(key), [v.material for v in key.versions])
        except BrokerError:
            await self._release(name, owner)
            raise

        def record(k: Key) -> Key:
            done = k if k.state is State.DESTROYED else k.destroyed(self.now())
            return replace(done, work_claim=None)

        destroyed = await self._update(name, record)
        log.info("key_destroyed", key=name)
        return destroyed

    async def run_due_work(self) -> dict[str, list[str]]:
        """One pass of the scheduler: rotations and destructions whose time has come."""
        done: dict[str, list[str]] = {"rotated": [], "destroyed": []}
        now = self.now()
        for key in await self._readable_keys():
            try:
                if key.rotation_due(now) and await self.rotate_if_due(key.name) is not None:
                    done["rotated"].append(key.name)
                if key.destruction_due(now) and await self.destroy_if_due(key.name) is not None:
                    done["destroyed"].append(key.name)
            except BrokerError as exc:
                log.warning("scheduled_work_failed", key=key.name, error=exc.detail)
            except Exception:
                # One key's unforeseen failure must not end the pass for the keys after it
                # (every pass, on every replica, would stop at that key).
                log.exception("scheduled_work_crashed", key=key.name)
        return done

    async def _readable_keys(self) -> list[Key]:
        """Every key whose registry entry reads; one that does not (written around the broker,
        or Vault failing on it) is logged and skipped, so it cannot stop the pass for the rest."""
        names = await self._registry.names()
        keys: list[Key] = []
        for start in range(0, len(names), READ_CONCURRENCY):
            chunk = names[start : start + READ_CONCURRENCY]
            found = await asyncio.gather(*(self._registry.read(n) for n in chunk), return_exceptions=True)
            for name, entry in zip(chunk, found, strict=True):
                if isinstance(entry, BrokerError | KeyError | TypeError | ValueError | AttributeError):
                    log.warning("scheduled_work_skipped", key=name, error=_reason(entry))
                elif isinstance(entry, BaseException):
                    raise entry
                elif entry is not None:
                    keys.append(entry[0])
        return keys

    # -- cryptography -----------------------------------------------------------------

    async def encrypt(self, name: str | Key, plaintext: bytes, context: Context) -> Sealed:
        key = await self.resolve(name)
        key.check_usable(Op.ENCRYPT)
        v = key.latest
        payload = await self.backend(key).encrypt(self.ref(key), v.material, plaintext, context)
        return Sealed(ciphertext.Envelope(key.name, v.number, payload).encode(), v.number)

    async def encrypt_batch(
        self, name: str | Key, items: Sequence[tuple[bytes, Context]]
    ) -> list[Sealed | BrokerError]:
        """Many encryptions under the latest version in one backend call where the backend batches."""
        key = await self.resolve(name)
        key.check_usable(Op.ENCRYPT)
        v = key.latest
        out = await self.backend(key).encrypt_batch(self.ref(key), v.material, items)
        return [
            r
            if isinstance(r, BrokerError)
            else Sealed(ciphertext.Envelope(key.name, v.number, r).encode(), v.number)
            for r in out
        ]

    async def decrypt_batch(
        self, name: str | Key, items: Sequence[tuple[str, Context]]
    ) -> list[bytes | BrokerError]:
        """Many decryptions; an item that fails (bad ciphertext, retired version) fails alone."""
        key = await self.resolve(name)
        key.check_usable(Op.DECRYPT)
        results: list[bytes | BrokerError | None] = [None] * len(items)
        calls: list[tuple[str, bytes, Context]] = []
        positions: list[int] = []
        for i, (text, context) in enumerate(items):
            try:
                envelope = ciphertext.decode(text)
                if envelope.key != key.name:
                    raise DecryptionFailed()
                key.check_usable(Op.DECRYPT, version=envelope.version)
                calls.append((self._version_for(key, envelope).material, envelope.payload, context))
                positions.append(i)
            except BrokerError as exc:
                results[i] = exc
        if calls:
            for i, r in zip(
                positions, await self.backend(key).decrypt_batch(self.ref(key), calls), strict=True
            ):
                results[i] = r
        return [r if r is not None else DecryptionFailed() for r in results]

    async def _open(self, name: str | Key, text: str) -> tuple[Key, ciphertext.Envelope]:
        key = await self.resolve(name)
        envelope = ciphertext.decode(text)
        if envelope.key != key.name:
            raise DecryptionFailed()
        return key, envelope

    def _version_for(self, key: Key, envelope: ciphertext.Envelope) -> Version:
        try:
            return key.version(envelope.version)
        except BadRequest:
            raise DecryptionFailed() from None

    async def decrypt(self, name: str | Key, text: str, context: Context) -> bytes:
        key, envelope = await self._open(name, text)
        key.check_usable(Op.DECRYPT, version=envelope.version)
        v = self._version_for(key, envelope)
        return await self.backend(key).decrypt(self.ref(key), v.material, envelope.payload, context)

    async def data_key(self, name: str | Key, nbytes: int, context: Context) -> tuple[bytes, Sealed]:
        if nbytes not in DATAKEY_SIZES:
            raise BadRequest(f"bytes must be one of {', '.join(map(str, DATAKEY_SIZES))}")
        key = await self.resolve(name)
        key.check_usable(Op.DATAKEY)
        v = key.latest
        plaintext, payload = await self.backend(key).data_key(self.ref(key), v.material, nbytes, context)
        return plaintext, Sealed(ciphertext.Envelope(key.name, v.number, payload).encode(), v.number)

    async def rewrap(
        self, name: str | Key, text: str, context: Context, *, to_key: str | Key | None, admin: bool
    ) -> Sealed:
        """Re-encrypt under the latest version of this key or of ``to_key``; the plaintext stays here."""
        source, envelope = await self._open(name, text)
        source.check_usable(Op.REWRAP_FROM, version=envelope.version, admin_rewrap=admin)
        src_version = self._version_for(source, envelope)
        to_name = to_key.name if isinstance(to_key, Key) else to_key
        target = source if to_key is None or to_name == source.name else await self.resolve(to_key)
        target.check_usable(Op.ENCRYPT)
        dst_version = target.latest
        if target.name == source.name:
            payload = await self.backend(source).reencrypt(
                self.ref(source), src_version.material, dst_version.material, envelope.payload, context
            )
        else:
            plaintext = await self.backend(source).decrypt(
                self.ref(source), src_version.material, envelope.payload, context
            )
            payload = await self.backend(target).encrypt(
                self.ref(target), dst_version.material, plaintext, context
            )
            del plaintext
        return Sealed(
            ciphertext.Envelope(target.name, dst_version.number, payload).encode(), dst_version.number
        )

    async def sign(self, name: str | Key, digest: bytes) -> Sealed:
        key = await self.resolve(name)
        key.check_usable(Op.SIGN)
        v = key.latest
        signature = await self.backend(key).sign(self.ref(key), v.material, digest)
        return Sealed(ciphertext.Envelope(key.name, v.number, signature).encode(), v.number)

    async def verify(self, name: str | Key, digest: bytes, signature: str) -> bool:
        key = await self.resolve(name)
        key.check_usable(Op.VERIFY)
        try:
            envelope = ciphertext.decode(signature)
        except DecryptionFailed:
            return False
        if envelope.key != key.name:
            return False
        key.check_usable(Op.VERIFY, version=envelope.version)
        try:
            v = key.version(envelope.version)
        except BadRequest:
            return False
        return await self.backend(key).verify(self.ref(key), v.material, digest, envelope.payload)


def digest_of(message: bytes | None, digest: bytes | None) -> bytes:
    """The SHA-256 digest to sign: of ``message``, or ``digest`` as given (32 bytes)."""
    if message is not None and digest is None:
        return hashlib.sha256(message).digest()
    if digest is not None and message is None:
        if len(digest) != 32:
            raise BadRequest("digest must be a SHA-256 digest (32 bytes)")
        return digest
    raise BadRequest("give exactly one of message or digest")


class _NotDue(Exception):
    """The work is not due, or another replica holds a live claim on it."""


class _ClaimLost(Exception):
    """Our claim lapsed and another replica took the work over."""


# How far replicas' clocks may disagree about a claim's lease.
_CLOCK_SKEW = timedelta(seconds=60)


def _reason(exc: BaseException) -> str:
    """What went wrong reading an entry, without its content (a KeyError's text is the field)."""
    if isinstance(exc, BrokerError):
        return exc.detail
    return f"unreadable registry entry ({exc.__class__.__name__})"


def _claim_owner() -> str:
    """A fresh owner id per attempt: the same replica's next attempt is a new claimant too."""
    return uuid.uuid4().hex


async def scheduler_loop(service: KeyService, interval: float) -> None:
    """Run :meth:`KeyService.run_due_work` every ``interval`` seconds until cancelled.

    No pass may end the loop: a replica whose scheduler died would silently never rotate
    or destroy again, so anything unexpected is logged and the next pass runs as usual.
    """

    async def one_pass() -> None:
        done = await service.run_due_work()
        if done["rotated"] or done["destroyed"]:
            log.info("scheduled_work", **done)

    await periodic.every(interval, one_pass, what="scheduler_pass")
