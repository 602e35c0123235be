"""The policy document in Vault KV, cached in each replica and refreshed in the background.

One KV entry (``policy/document``) holds roles, bindings and settings, so a whole
``keybroker policy apply`` lands atomically (check-and-set) or not at all. Each
replica re-reads it every ``policy.refresh_seconds``; a change made through one
replica is enforced by all of them within that interval, without a restart.

Fail closed: until a document has been read, or once the cached one is older than
``policy.max_stale_seconds`` because Vault cannot be read, every request is refused
with 503. When the stored document does not validate, every principal is denied
except the config's break-glass administrators, so that they can store a valid one. When no document
has been stored yet, the packaged default roles apply with no bindings: only the
config's break-glass administrators can do anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from broker.backends.vault import VaultClient
from broker.errors import BrokerError, Conflict, Unavailable
from broker.log import get_logger
from broker.policy.document import PolicyInvalid, load_file_text, parse_document, to_document
from broker.policy.model import PolicySet, Role, Rule
from broker.state.kv import CasConflict, KvDocuments

log = get_logger(__name__)
DOCUMENT = "document"
# The role the config's break-glass administrators hold; not a valid stored role name,
# so no stored document can define, change or remove it.
BREAK_GLASS_ROLE = "config:administrators"


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
        self._break_glass = break_glass
        self._refresh = refresh_seconds
        self._max_stale = max_stale_seconds
        self._monotonic = monotonic
        self._defaults = default_policy()
        self._snapshot: Snapshot | None = None
        self._loaded_at = 0.0
        self._problem = "the policy document has not been read from Vault yet"

    # -- reading ---------------------------------------------------------------------

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

    async def load(self) -> Snapshot:
        """Read the document from Vault now; keep the last good one on failure."""
        try:
            found = await self._docs.read(DOCUMENT)
        except BrokerError as exc:
            self._problem = f"cannot read it from Vault: {exc.detail}"
            raise
        if found is None:
            snap = self._snap(self._defaults, 0)
        else:
            data, version = found
            try:
                snap = self._snap(parse_document(data, source="vault policy/document"), version)
            except PolicyInvalid as exc:
                # Written around the broker's validation (Vault directly, or an older broker's
                # format): nobody but the break-glass administrators may do anything, and they
                # may store a valid document again.
                self._problem = f"the stored document is invalid: {exc}"
                problems = [str(p) for p in exc.problems]
                # The problems are the message; a traceback would add nothing.
                log.error("policy_invalid", version=version, problems=problems)  # noqa: TRY400
                empty = PolicySet(roles={}, bindings={}, settings=self._defaults.settings)
                snap = replace(self._snap(empty, version), policy=self._defaults, invalid=self._problem)
        if self._snapshot is None or snap.version != self._snapshot.version:
            log.info("policy_loaded", version=snap.version, roles=sorted(snap.policy.roles))
        self._snapshot, self._loaded_at = snap, self._monotonic()
        if not snap.invalid:
            self._problem = "no refresh has succeeded since"
        return snap

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
            effective = replace(policy, roles=roles, bindings=bindings)
        return Snapshot(policy, effective, version)

    async def refresh_loop(self) -> None:
        """Re-read every ``refresh_seconds`` until cancelled; failures are logged and retried."""
        while True:
            try:
                await self.load()
            except BrokerError as exc:
                log.warning("policy_refresh_failed", error=exc.detail)
            await asyncio.sleep(self._refresh)

    # -- writing ---------------------------------------------------------------------

    async def replace_document(self, policy: PolicySet, expected_version: int | None) -> Snapshot:
        """Store a whole validated policy set, check-and-set against ``expected_version``.

        Without an expected version, the version this replica read last is used, so a
        change made elsewhere in between is never silently overwritten.
        """
        base = self.current().version if expected_version is None else expected_version
        try:
            version = await self._docs.write(DOCUMENT, to_document(policy), base)
        except CasConflict:
            raise Conflict(
                f"the policy document changed since version {base}; read it again and re-apply"
            ) from None
        snap = self._snap(policy, version)
        self._snapshot, self._loaded_at = snap, self._monotonic()
        log.info("policy_written", version=version, roles=sorted(policy.roles))
        return snap

    async def change(self, edit: Callable[[dict[str, Any]], Mapping[str, Any]]) -> Snapshot:
        """Apply ``edit`` to the latest stored document (re-read, validated, check-and-set, retried)."""

        def apply(current: dict[str, Any] | None) -> dict[str, Any]:
            base = to_document(self._defaults) if current is None else current
            edited = dict(edit(dict(base)))
            return to_document(parse_document(edited))

        written, version = await self._docs.update(DOCUMENT, apply)
        snap = self._snap(parse_document(written), version)
        self._snapshot, self._loaded_at = snap, self._monotonic()
        log.info("policy_written", version=version, roles=sorted(snap.policy.roles))
        return snap
