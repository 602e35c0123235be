"""A logical key, its versions and the state machine of ARCHITECTURE.md (NIST SP 800-57 / KMIP).

::

    pre-active ─▶ active ⇄ suspended
                   │  └──────────────▶ deactivated (retired: decrypt/verify only)
                   ├──────────────────▶ compromised (nothing but an administrator's rewrap-away)
      active|suspended|deactivated|compromised ─▶ pending-destruction ─▶ destroyed
                                                   └─ cancel ─▶ suspended (or back to
                                                      deactivated/compromised: a cancel never
                                                      makes a revoked key usable again)

Everything here is pure: the clock is a parameter, storage is elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from broker.errors import BadRequest, Conflict, UnsupportedOperation
from broker.printable import shown
from broker.timeutil import iso, iso_or_none, parse_iso, parse_iso_or_none
from broker.vocab import Backend, KeyType

# The one name rule. ASCII only and used with fullmatch (``$`` would let a trailing newline
# through with match()): no "/", "?", "%", "\\", NUL or look-alike letter can ever be part of
# a key name, so a name is always exactly one safe path segment.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
NAME_RULE = "1-63 characters of a-z, 0-9, '-', '_', '.', starting with a letter or digit"
MIN_PENDING_DAYS, MAX_PENDING_DAYS = 7, 30
# The shortest scheduled-rotation period accepted: rotating faster only grows version lists.
MIN_ROTATION_SECONDS = 3600
# And the longest (100 years): a period beyond any key's life is a typo, not a schedule.
MAX_ROTATION_SECONDS = 100 * 366 * 24 * 3600


class InvalidKeyName(BadRequest):
    """A key name (in a path, a body, a grant) that breaks the name rule: refused before any lookup."""

    code = "invalid_key_name"
    title = "Invalid key name"


def check_name(value: object, where: str = "key name") -> str:
    """``value`` if it is a valid key name, else :class:`InvalidKeyName` (the value is not echoed)."""
    if not isinstance(value, str) or NAME_RE.fullmatch(value) is None:
        raise InvalidKeyName(f"{where} must be {NAME_RULE}")
    return value


class State(StrEnum):
    PRE_ACTIVE = "pre-active"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DEACTIVATED = "deactivated"
    COMPROMISED = "compromised"
    PENDING_DESTRUCTION = "pending-destruction"
    DESTROYED = "destroyed"


class Op(StrEnum):
    """Cryptographic uses of a key; lifecycle changes are separate methods below."""

    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    DATAKEY = "datakey"
    SIGN = "sign"
    VERIFY = "verify"
    # Decrypting the source of a rewrap: allowed where decrypt is, and on a compromised
    # key for an administrator moving data away from it.
    REWRAP_FROM = "rewrap-from"


_USABLE: dict[Op, frozenset[State]] = {
    Op.ENCRYPT: frozenset({State.ACTIVE}),
    Op.DATAKEY: frozenset({State.ACTIVE}),
    Op.SIGN: frozenset({State.ACTIVE}),
    Op.DECRYPT: frozenset({State.ACTIVE, State.DEACTIVATED}),
    Op.VERIFY: frozenset({State.ACTIVE, State.DEACTIVATED}),
    Op.REWRAP_FROM: frozenset({State.ACTIVE, State.DEACTIVATED}),
}
_SYMMETRIC_OPS = {Op.ENCRYPT, Op.DECRYPT, Op.DATAKEY, Op.REWRAP_FROM}
_SIGNING_OPS = {Op.SIGN, Op.VERIFY}


@dataclass(frozen=True)
class Version:
    number: int
    # The backend's handle for this version's material (transit version, KMS key id, PKCS#11 id).
    material: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {"version": self.number, "material": self.material, "created_at": iso(self.created_at)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Version:
        return cls(int(raw["version"]), str(raw["material"]), parse_iso(raw["created_at"]))


@dataclass(frozen=True)
class WorkClaim:
    """A replica's lease on one piece of scheduled work for a key (a rotation, a destruction).

    Written into the key's own entry with check-and-set, so exactly one replica holds it; it
    lapses at ``until`` (a replica that died mid-work does not block the next one for ever)
    and is cleared when the work is recorded or has failed, so the next tick tries again.
    """

    work: str
    owner: str
    until: datetime

    def live(self, now: datetime) -> bool:
        return now < self.until

    def to_json(self) -> dict[str, Any]:
        return {"work": self.work, "owner": self.owner, "until": iso(self.until)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> WorkClaim:
        return cls(str(raw["work"]), str(raw["owner"]), parse_iso(raw["until"]))

    @classmethod
    def from_stored(cls, raw: Any) -> WorkClaim | None:
        """The claim in a stored entry; None when there is none or it is not one a broker wrote
        (wrong types, a field missing): such a claim holds nothing and the next claim replaces it,
        rather than one bad field stopping the key's scheduled work or every read of the key."""
        if not raw:
            return None
        try:
            if not all(isinstance(raw[f], str) and raw[f] for f in ("work", "owner", "until")):
                return None
            return cls.from_json(raw)
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class Key:
    name: str
    backend: Backend
    type: KeyType
    environment: str
    state: State
    created_at: datetime
    updated_at: datetime
    versions: tuple[Version, ...] = ()
    min_decrypt_version: int = 1
    rotation_period_seconds: int | None = None
    deletion_protection: bool = True
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""
    owner: str = ""
    # State changes that need remembering.
    state_before_destruction: State | None = None
    destroy_after: datetime | None = None
    destroyed_at: datetime | None = None
    revoked_reason: str | None = None
    last_rotated_at: datetime | None = None
    # Scheduled work a replica is doing on this key right now (never shown by the API).
    work_claim: WorkClaim | None = None

    # -- reading ------------------------------------------------------------------------

    @property
    def latest(self) -> Version:
        if not self.versions:
            raise Conflict(f"key {self.name} has no usable version yet (state {self.state})")
        return self.versions[-1]

    def version(self, number: int) -> Version:
        for v in self.versions:
            if v.number == number:
                return v
        raise BadRequest(f"key {self.name} has no version {number}")

    def rotation_due(self, now: datetime) -> bool:
        if self.state is not State.ACTIVE or not self.rotation_period_seconds or not self.versions:
            return False
        since = self.last_rotated_at or self.latest.created_at
        # Compared as seconds: a period accepted up to 2^53 s can end past year 9999, where a
        # datetime (and a timedelta) overflows; such a rotation is simply never due.
        return (now - since).total_seconds() >= self.rotation_period_seconds

    def destruction_due(self, now: datetime) -> bool:
        return (
            self.state is State.PENDING_DESTRUCTION
            and self.destroy_after is not None
            and now >= self.destroy_after
        )

    def claimed_by_other(self, now: datetime, owner: str, longest: timedelta | None = None) -> bool:
        """Whether another replica holds a live claim on scheduled work for this key. A claim
        lasting longer than ``longest`` from now was not taken by a broker (each takes at most
        its claim lease): it holds nothing, or a bogus far-future lease would block the key for ever."""
        claim = self.work_claim
        if claim is None or claim.owner == owner or not claim.live(now):
            return False
        return longest is None or claim.until <= now + longest

    def check_usable(self, op: Op, *, version: int | None = None, admin_rewrap: bool = False) -> None:
        """Refuse (409) an operation the state or the version forbids; 400 one the type cannot do."""
        if op in _SYMMETRIC_OPS and not self.type.symmetric:
            raise UnsupportedOperation(f"key {self.name} is {self.type}: it cannot {op}")
        if op in _SIGNING_OPS and self.type.symmetric:
            raise UnsupportedOperation(f"key {self.name} is {self.type}: it cannot {op}")
        allowed = _USABLE[op]
        if op is Op.REWRAP_FROM and admin_rewrap:
            allowed = allowed | {State.COMPROMISED}
        if self.state not in allowed:
            raise Conflict(f"key {self.name} is {self.state}: {op} is not allowed")
        retired = version is not None and version < self.min_decrypt_version
        if retired and op in (Op.DECRYPT, Op.VERIFY, Op.REWRAP_FROM):
            raise Conflict(
                f"key {self.name} version {version} is retired "
                f"(min_decrypt_version is {self.min_decrypt_version})"
            )

    # -- changing (each returns a new Key) ------------------------------------------

    def _to(self, state: State, now: datetime, **changes: Any) -> Key:
        return replace(self, state=state, updated_at=now, **changes)

    def _require(self, action: str, *states: State) -> None:
        if self.state not in states:
            allowed = ", ".join(states)
            raise Conflict(f"key {self.name} is {self.state}: cannot {action} (allowed from: {allowed})")

    def activated(self, version: Version, now: datetime) -> Key:
        self._require("activate", State.PRE_ACTIVE)
        return self._to(State.ACTIVE, now, versions=(version,), last_rotated_at=now)

    def with_version(self, material: str, now: datetime) -> Key:
        self._require("rotate", State.ACTIVE)
        number = self.versions[-1].number + 1 if self.versions else 1
        return replace(
            self,
            versions=(*self.versions, Version(number, material, now)),
            updated_at=now,
            last_rotated_at=now,
        )

    def suspended(self, now: datetime) -> Key:
        self._require("suspend", State.ACTIVE)
        return self._to(State.SUSPENDED, now)

    def resumed(self, now: datetime) -> Key:
        self._require("resume", State.SUSPENDED)
        return self._to(State.ACTIVE, now)

    def revoked(self, reason: str, now: datetime) -> Key:
        if reason == "retired":
            self._require("revoke as retired", State.ACTIVE, State.SUSPENDED)
            return self._to(State.DEACTIVATED, now, revoked_reason=reason)
        if reason == "compromised":
            self._require("revoke as compromised", State.ACTIVE, State.SUSPENDED, State.DEACTIVATED)
            return self._to(State.COMPROMISED, now, revoked_reason=reason)
        raise BadRequest(f"reason must be 'retired' or 'compromised', not {shown(reason)}")

    def destruction_scheduled(self, pending_days: int, now: datetime) -> Key:
        if not MIN_PENDING_DAYS <= pending_days <= MAX_PENDING_DAYS:
            raise BadRequest(
                f"pending_days must be {MIN_PENDING_DAYS}..{MAX_PENDING_DAYS}, not {pending_days}"
            )
        self._require(
            "schedule destruction",
            State.ACTIVE,
            State.SUSPENDED,
            State.DEACTIVATED,
            State.COMPROMISED,
        )
        if self.deletion_protection:
            raise Conflict(
                f"key {self.name} has deletion protection on; turn it off first "
                "(PATCH deletion_protection=false, or: keybroker keys update NAME --deletion-protection off)"
            )
        return self._to(
            State.PENDING_DESTRUCTION,
            now,
            state_before_destruction=self.state,
            destroy_after=now + timedelta(days=pending_days),
        )

    def destruction_cancelled(self, now: datetime) -> Key:
        self._require("cancel destruction", State.PENDING_DESTRUCTION)
        claim = self.work_claim
        if claim is not None and claim.work == "destroy" and claim.live(now):
            # A replica is removing the material right now: a cancel would bring back a key
            # whose backend material is (about to be) gone.
            raise Conflict(f"key {self.name} is being destroyed now: too late to cancel")
        before = self.state_before_destruction
        back = before if before in (State.DEACTIVATED, State.COMPROMISED) else State.SUSPENDED
        return self._to(back, now, state_before_destruction=None, destroy_after=None)

    def destroyed(self, now: datetime) -> Key:
        self._require("destroy", State.PENDING_DESTRUCTION)
        return self._to(State.DESTROYED, now, destroyed_at=now)

    def patched(self, changes: dict[str, Any], now: datetime) -> Key:
        if self.state is State.DESTROYED:
            raise Conflict(f"key {self.name} is destroyed")
        fields: dict[str, Any] = {}
        if "min_decrypt_version" in changes:
            mdv = changes["min_decrypt_version"]
            if not 1 <= mdv <= self.latest.number:
                raise BadRequest(f"min_decrypt_version must be 1..{self.latest.number}")
            fields["min_decrypt_version"] = mdv
        for name in ("rotation_period_seconds", "deletion_protection", "tags", "description"):
            if name in changes:
                fields[name] = changes[name]
        return replace(self, updated_at=now, **fields)

    # -- storage form -------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": str(self.backend),
            "type": str(self.type),
            "environment": self.environment,
            "state": str(self.state),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "versions": [v.to_json() for v in self.versions],
            "min_decrypt_version": self.min_decrypt_version,
            "rotation_period_seconds": self.rotation_period_seconds,
            "deletion_protection": self.deletion_protection,
            "tags": dict(self.tags),
            "description": self.description,
            "owner": self.owner,
            "state_before_destruction": None
            if self.state_before_destruction is None
            else str(self.state_before_destruction),
            "destroy_after": iso_or_none(self.destroy_after),
            "destroyed_at": iso_or_none(self.destroyed_at),
            "revoked_reason": self.revoked_reason,
            "last_rotated_at": iso_or_none(self.last_rotated_at),
            "work_claim": None if self.work_claim is None else self.work_claim.to_json(),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Key:
        created, updated = parse_iso(raw["created_at"]), parse_iso(raw["updated_at"])
        before = raw.get("state_before_destruction")
        return cls(
            name=raw["name"],
            backend=Backend(raw["backend"]),
            type=KeyType(raw["type"]),
            environment=raw["environment"],
            state=State(raw["state"]),
            created_at=created,
            updated_at=updated,
            versions=tuple(Version.from_json(v) for v in raw.get("versions", [])),
            min_decrypt_version=int(raw.get("min_decrypt_version", 1)),
            rotation_period_seconds=raw.get("rotation_period_seconds"),
            deletion_protection=bool(raw.get("deletion_protection", True)),
            tags=dict(raw.get("tags") or {}),
            description=str(raw.get("description", "")),
            owner=str(raw.get("owner", "")),
            state_before_destruction=None if before is None else State(before),
            destroy_after=parse_iso_or_none(raw.get("destroy_after")),
            destroyed_at=parse_iso_or_none(raw.get("destroyed_at")),
            revoked_reason=raw.get("revoked_reason"),
            last_rotated_at=parse_iso_or_none(raw.get("last_rotated_at")),
            work_claim=WorkClaim.from_stored(raw.get("work_claim")),
        )

    def public(self) -> dict[str, Any]:
        """What the API shows: everything but the backend material references."""
        out = self.to_json()
        del out["work_claim"]
        out["versions"] = [{"version": v.number, "created_at": iso(v.created_at)} for v in self.versions]
        out["latest_version"] = self.versions[-1].number if self.versions else None
        return out
