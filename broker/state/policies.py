"""The policy document in Vault KV, cached in each replica and refreshed in the background.

One KV entry (``policy/document``) holds roles, bindings and settings, so a whole
``keybroker policy apply`` lands atomically (check-and-set) or not at all. Each
replica re-reads it every ``policy.refresh_seconds``; a change made through one
replica is enforced by all of them within that interval, without a restart.

Fail closed: until a document has been read, or once the cached one is older than
``policy.max_stale_seconds`` because Vault cannot be read, every request is refused
with 503. When the stored document does not validate, every principal is denied
except the config's break-glass administrators, so that they can store a valid one; the
others get 503 ``policy_invalid`` (not an ordinary 403). When no document has been
stored yet, the packaged default roles apply with no bindings: only the config's
break-glass administrators can do anything.

Every write is a read-merge-write of what Vault holds *now* (:meth:`PolicyStore.write`),
never of this replica's cache: the cache may be up to ``refresh_seconds`` old, and
merging from it would bring back a binding that another replica just removed.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from broker import periodic
from broker.backends.vault import VaultClient
from broker.errors import BrokerError, Conflict, NotFound, Unavailable
from broker.log import get_logger
from broker.policy.document import PolicyInvalid, load_file_text, parse_document, to_document
from broker.policy.model import BREAK_GLASS_ROLE, PolicySet, Role, Rule, principal_from_id
from broker.state.kv import MAX_ATTEMPTS, CasConflict, KvDocuments

log = get_logger(__name__)
DOCUMENT = "document"
__all__ = ["BREAK_GLASS_ROLE", "PolicyStore", "Snapshot", "Stored", "default_policy"]


def default_policy() -> PolicySet:
    """The roles shipped in ``config/policies.yaml`` (packaged as ``default-policies.yaml``)."""
    text = resources.files("broker.policy").joinpath("default-policies.yaml").read_text()
    return load_file_text(text, "default-policies.yaml")


@dataclass(frozen=True)
class Snapshot:
    policy: PolicySet  # as stored (or the defaults): what the API shows and edits
    effective: PolicySet  # plus the break-glass administrators: what the engine decides with
    version: int  # KV version; 0 = nothing stored yet
    # Set when the stored document does not validate: only break-glass administrators act,
    # so they can store a valid one (nobody else can do anything).
    invalid: str | None = None


@dataclass(frozen=True)
class Stored:
    """The document as Vault holds it right now (not a replica's cache)."""

    version: int  # KV version; 0 = nothing stored yet
    raw: dict[str, Any] | None  # exactly as stored; None when nothing is
    policy: PolicySet | None  # None when the stored document does not validate
    problems: tuple[str, ...] = field(default=())

    @property
    def invalid(self) -> bool:
        return self.policy is None

    def base(self, defaults: PolicySet) -> dict[str, Any]:
        """What an edit starts from: the stored document as stored (even invalid), or the defaults."""
        return dict(self.raw) if self.raw is not None else to_document(defaults)

    def document(self, defaults: PolicySet) -> dict[str, Any]:
        """What to show: the canonical form of a valid document, an invalid one as stored."""
        if self.policy is not None:
            return to_document(self.policy)
        return self.base(defaults)

    def bindings(self) -> dict[str, Any] | None:
        """The stored bindings as stored (read even from an invalid document); None if unreadable."""
        if self.policy is not None:
            return dict(to_document(self.policy)["bindings"])
        if self.raw is None:
            return {}
        found = self.raw.get("bindings")
        if found is None:
            return {}
        return dict(found) if isinstance(found, dict) else None


class PolicyStore:
    def __init__(
        self,
        vault: VaultClient,
        kv_mount: str,
        *,
        break_glass: tuple[str, ...] = (),
        refresh_seconds: float = 2.0,
        max_stale_seconds: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._docs = KvDocuments(vault, kv_mount, "policy")
        self._break_glass = tuple(_canonical_id(p) for p in break_glass)
        self._refresh = refresh_seconds
        self._max_stale = max_stale_seconds
        self._monotonic = monotonic
        self._defaults = default_policy()
        self._snapshot: Snapshot | None = None
        self._loaded_at = 0.0
        # Counts the snapshots a write or fresh read set: a refresh that read Vault before one of
        # them and finished after it holds an older document and must not replace the newer one.
        self._remembered = 0
        self._problem = "the policy document has not been read from Vault yet"

    # -- reading ---------------------------------------------------------------------

    @property
    def defaults(self) -> PolicySet:
        """The packaged roles: what applies while nothing is stored."""
        return self._defaults

    def current(self) -> Snapshot:
        """The policy to decide with; raises 503 when it is missing, invalid or too old."""
        snap = self._snapshot
        if snap is None:
            raise Unavailable(f"policies unavailable: {self._problem}", backend="policy")
        age = self._monotonic() - self._loaded_at
        if age > self._max_stale:
            raise Unavailable(
                f"policies unavailable: the cached policy is {age:.0f}s old ({self._problem})",
                backend="policy",
            )
        return snap

    async def health(self) -> dict[str, Any]:
        """For /v1/sys/health: whether decisions can be made, and from which document version."""
        try:
            snap = self.current()
        except BrokerError as exc:
            return {"ok": False, "error": exc.detail}
        if snap.invalid:
            return {"ok": False, "version": snap.version, "error": snap.invalid}
        age = round(self._monotonic() - self._loaded_at, 1)
        return {"ok": True, "version": snap.version, "age_seconds": age}

    def is_break_glass(self, principal_id: str) -> bool:
        return principal_id in self._break_glass

    async def stored(self) -> Stored:
        """Read the document from Vault now, as stored, valid or not (the cache is not touched)."""
        found = await self._docs.read(DOCUMENT)
        if found is None:
            return Stored(0, None, self._defaults)
        data, version = found
        try:
            return Stored(version, data, parse_document(data, source="vault policy/document"))
        except PolicyInvalid as exc:
            return Stored(version, data, None, tuple(str(p) for p in exc.problems))

    async def fresh(self) -> Snapshot:
        """The policy as Vault holds it now (and remembered as this replica's cache if newer).

        For decisions whose result outlives the refresh interval, such as creating a grant.
        """
        stored = await self.stored()
        if stored.policy is None:
            return self._invalid_snap(stored)
        return self._remember(self._snap(stored.policy, stored.version))

    async def load(self) -> Snapshot:
        """Read the document from Vault now; keep the last good one on failure."""
        remembered = self._remembered
        try:
            stored = await self.stored()
        except BrokerError as exc:
            self._problem = f"cannot read it from Vault: {exc.detail}"
            raise
        if stored.policy is not None:
            snap = self._snap(stored.policy, stored.version)
        else:
            # Written around the broker's validation (Vault directly, or an older broker's
            # format): nobody but the break-glass administrators may do anything, and they
            # may store a valid document again.
            log.error("policy_invalid", version=stored.version, problems=list(stored.problems))
            snap = self._invalid_snap(stored)
            self._problem = snap.invalid or ""
        current = self._snapshot
        if current is not None and remembered != self._remembered and snap.version < current.version:
            # A write through this replica landed while this read was on its way: what it read is
            # older (it would bring a removed binding back until the next refresh). A lower version
            # with no write in between is kept: the document was deleted and written anew in Vault.
            return current
        if current is None or snap.version != current.version:
            log.info("policy_loaded", version=snap.version, roles=sorted(snap.policy.roles))
        self._snapshot, self._loaded_at = snap, self._monotonic()
        if not snap.invalid:
            self._problem = "no refresh has succeeded since"
        return snap

    def _invalid_snap(self, stored: Stored) -> Snapshot:
        """Nobody bound to anything; the break-glass administrators alone (the API shows the defaults)."""
        empty = PolicySet(roles={}, bindings={}, settings=self._defaults.settings)
        problem = "the stored document is invalid: " + "; ".join(stored.problems)
        return replace(self._snap(empty, stored.version), policy=self._defaults, invalid=problem)

    def _snap(self, policy: PolicySet, version: int) -> Snapshot:
        effective = policy
        if self._break_glass:
            roles = {
                **policy.roles,
                BREAK_GLASS_ROLE: Role(BREAK_GLASS_ROLE, (Rule(BREAK_GLASS_ROLE, ("*",)),)),
            }
            bindings = dict(policy.bindings)
            for principal in self._break_glass:
                bindings[principal] = (*bindings.get(principal, ()), BREAK_GLASS_ROLE)
            effective = replace(
                policy, roles=roles, bindings=bindings, break_glass=frozenset(self._break_glass)
            )
        return Snapshot(policy, effective, version)

    async def refresh_loop(self) -> None:
        """Re-read every ``refresh_seconds`` until cancelled; failures are logged and retried."""
        await periodic.every(self._refresh, self.load, what="policy_refresh")

    # -- writing ---------------------------------------------------------------------

    async def delete_role(self, name: str) -> Snapshot:
        """Remove a role from the document as stored now (see :func:`without_role` for when not)."""
        return await self.write(lambda stored: without_role(stored.base(self.defaults), name))

    async def write(
        self, build: Callable[[Stored], Mapping[str, Any]], expected_version: int | None = None
    ) -> Snapshot:
        """Store ``build(what Vault holds now)``, validated whole, check-and-set; retried on a race.

        ``build`` gets a fresh read every attempt, so whatever it keeps from the stored
        document (bindings when only roles change, roles when only bindings change) is
        what is stored at the moment of writing, never a replica's cached copy. It may
        raise a :class:`BrokerError` to refuse. With ``expected_version`` (the version
        the client based its change on), a document at any other version is a 409:
        the client must look at what changed and decide again. Raises
        :class:`PolicyInvalid` when the result does not validate.
        """
        for attempt in range(MAX_ATTEMPTS):
            stored = await self.stored()
            if expected_version is not None and stored.version != expected_version:
                raise Conflict(
                    f"the policy document is at version {stored.version}, not {expected_version}: "
                    "it changed since you read it; read it again and re-apply"
                )
            policy = parse_document(dict(build(stored)))
            document = to_document(policy)
            if stored.raw == document:
                return self._remember(self._snap(policy, stored.version))
            try:
                version = await self._docs.write(DOCUMENT, document, stored.version)
            except CasConflict:
                if expected_version is not None:
                    raise Conflict(
                        f"the policy document changed since version {expected_version}; "
                        "read it again and re-apply"
                    ) from None
                await asyncio.sleep(random.uniform(0, min(0.002 * (attempt + 1), 0.05)))  # noqa: S311
                continue
            log.info("policy_written", version=version, roles=sorted(policy.roles))
            return self._remember(self._snap(policy, version))
        raise Unavailable(f"policy/{DOCUMENT}: gave up after {MAX_ATTEMPTS} conflicting concurrent updates")

    def _remember(self, snap: Snapshot) -> Snapshot:
        current = self._snapshot
        # A concurrent refresh may already hold a newer version; never step back to an older one.
        if current is None or current.invalid or snap.version >= current.version:
            self._snapshot, self._loaded_at = snap, self._monotonic()
            self._remembered += 1
            if not snap.invalid:
                self._problem = "no refresh has succeeded since"
        return snap


def _canonical_id(principal_id: str) -> str:
    """A configured principal id as the identity code spells it (SPIFFE domains lower-cased)."""
    try:
        return principal_from_id(principal_id).id
    except ValueError:
        return principal_id


def without_role(document: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``document`` minus role ``name``: refused while a principal is bound to it or it is the last one."""
    roles = _mapping(document.get("roles"))
    if name not in roles:
        raise NotFound(f"no role named {name!r}")
    bound = sorted(
        str(p)
        for p, names in _mapping(document.get("bindings")).items()
        if isinstance(names, list) and name in names
    )
    if bound:
        raise Conflict(f"role {name} is still bound to {', '.join(bound)}; change those bindings first")
    if len(roles) == 1:
        raise Conflict(f"role {name} is the last role; a policy needs at least one")
    return {**document, "roles": {k: v for k, v in roles.items() if k != name}}


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}
