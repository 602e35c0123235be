"""What the policy engine reasons about: principals, operations, rules, roles, grants, decisions.

Pure data; no I/O. The engine is :mod:`broker.policy.engine`, the document format
:mod:`broker.policy.document`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any

from broker.errors import Unauthenticated
from broker.printable import shown
from broker.timeutil import iso, parse_iso

SPIFFE_SCHEME = "spiffe://"
# The role the config's break-glass administrators hold; not a valid stored role name,
# so no stored document can define, change or remove it.
BREAK_GLASS_ROLE = "config:administrators"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``kind`` and ``name`` from a SPIFFE ID, or kind ``cn``."""

    kind: str
    name: str
    id: str

    def __str__(self) -> str:
        return self.id


def principal_from_peercert(cert: Mapping[str, Any] | None, trust_domain: str) -> Principal:
    """Read the principal from a verified peer certificate (``SSLObject.getpeercert()``).

    A SPIFFE URI SAN ``spiffe://<trust_domain>/<kind>/<name>`` wins; without any
    SPIFFE URI the subject CN is used. A SPIFFE URI for another trust domain or of
    another shape is refused rather than ignored: falling back to the CN would let
    a certificate meant for one identity scheme act under another.
    """
    if not cert:
        raise Unauthenticated("no verified client certificate")
    spiffe = [
        value
        for kind, value in _pairs(cert.get("subjectAltName", ()))
        if kind == "URI" and value.lower().startswith(SPIFFE_SCHEME)
    ]
    if spiffe:
        if len(spiffe) > 1:
            raise Unauthenticated("client certificate carries more than one SPIFFE ID")
        return _from_spiffe(spiffe[0], trust_domain)
    for rdn in cert.get("subject", ()):
        for attr, value in _pairs(rdn):
            if attr == "commonName" and value:
                if not value.isprintable():
                    # Named in logs, records, bindings and grants: printable text only (as principal_from_id).
                    raise Unauthenticated("client certificate's CN is not printable text")
                return Principal(kind="cn", name=value, id=f"cn:{value}")
    raise Unauthenticated("client certificate names no principal (no SPIFFE URI SAN, no CN)")


def principal_from_id(principal_id: str) -> Principal:
    """A principal from its id as bindings and grants write it: a SPIFFE ID or ``cn:<name>``.

    Raises ValueError naming the expected shapes.
    """
    # A cn: id is stored in grants and bindings and shown to operators: printable text only.
    if principal_id.startswith("cn:") and len(principal_id) > 3 and principal_id.isprintable():
        return Principal(kind="cn", name=principal_id[3:], id=principal_id)
    if principal_id.lower().startswith(SPIFFE_SCHEME):
        domain, _, path = principal_id[len(SPIFFE_SCHEME) :].partition("/")
        parts = path.split("/")
        if domain and len(parts) == 2 and all(_valid_segment(p) for p in parts):
            return Principal(kind=parts[0], name=parts[1], id=f"{SPIFFE_SCHEME}{domain.lower()}/{path}")
    raise ValueError(
        f"{shown(principal_id)} is not a principal id (spiffe://<domain>/<kind>/<name> or cn:<name>, "
        "printable)"
    )


def _from_spiffe(uri: str, trust_domain: str) -> Principal:
    rest = uri[len(SPIFFE_SCHEME) :]
    domain, _, path = rest.partition("/")
    if domain.lower() != trust_domain.lower():
        raise Unauthenticated("client certificate's SPIFFE ID is for another trust domain")
    parts = path.split("/")
    if len(parts) != 2 or not all(_valid_segment(p) for p in parts):
        raise Unauthenticated("client certificate's SPIFFE ID is not spiffe://<domain>/<kind>/<name>")
    kind, name = parts
    return Principal(kind=kind, name=name, id=f"{SPIFFE_SCHEME}{domain.lower()}/{kind}/{name}")


def _valid_segment(segment: str) -> bool:
    return bool(segment) and all(c.isalnum() or c in "-._" for c in segment) and segment not in (".", "..")


def _pairs(items: Sequence[Any]) -> list[tuple[str, str]]:
    return [(str(item[0]), str(item[1])) for item in items if len(item) == 2]


# -- operations -------------------------------------------------------------------------

# Every operation a policy can name. Key-scoped ones are decided against the key's
# metadata (name, backend, environment, tags); the others concern no single key.
KEY_OPERATIONS: tuple[str, ...] = (
    "key.create",
    "key.read",
    "key.update",
    "key.rotate",
    "key.suspend",
    "key.resume",
    "key.revoke",
    "key.schedule-destruction",
    "key.cancel-destruction",
    "crypto.encrypt",
    "crypto.decrypt",
    "crypto.datakey",
    "crypto.rewrap",
    "crypto.sign",
    "crypto.verify",
    "grant.create",
    "grant.list",
    "grant.revoke",
)
GLOBAL_OPERATIONS: tuple[str, ...] = (
    "key.list",
    "policy.read",
    "policy.write",
    "binding.read",
    "binding.write",
    "audit.read",
    "audit.verify",
    "sys.health",
    "sys.metrics",
)
# Retiring a grant is the grantee's own act (as in AWS KMS): no rule is needed for it.
GRANT_RETIRE = "grant.retire"
OPERATIONS: frozenset[str] = frozenset(KEY_OPERATIONS + GLOBAL_OPERATIONS)
# What a grant may hand out: using a key and reading it, never managing it or re-granting.
GRANTABLE: frozenset[str] = frozenset(op for op in KEY_OPERATIONS if op.startswith("crypto.")) | {"key.read"}


def is_key_operation(operation: str) -> bool:
    return operation in KEY_OPERATIONS


# -- rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeySelector:
    """Which keys a rule covers; an empty field matches every key. Values may be templates."""

    names: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    environments: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.names or self.backends or self.environments or self.tags)


@dataclass(frozen=True)
class ContextCondition:
    """What the encryption context must carry. Every named field must be present.

    ``equals`` values and ``allowed`` members may be templates such as ``{principal.name}``.
    """

    required: tuple[str, ...] = ()
    equals: tuple[tuple[str, str], ...] = ()
    allowed: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.required or self.equals or self.allowed)


@dataclass(frozen=True)
class Rule:
    """Allow (or, with ``effect: deny``, forbid) ``operations`` on the selected keys and contexts."""

    # How decisions, explanations and diffs name the rule: ``<role>/<name>`` for a named rule,
    # else ``<role>[<index>]`` (or a legacy explicit ``id``).
    id: str
    operations: tuple[str, ...]
    effect: str = "allow"
    keys: KeySelector = field(default_factory=KeySelector)
    context: ContextCondition = field(default_factory=ContextCondition)
    description: str = ""
    name: str = ""  # the rule's own name within its role, as written in the document


@dataclass(frozen=True)
class Role:
    name: str
    rules: tuple[Rule, ...]
    description: str = ""


@dataclass(frozen=True)
class PolicySettings:
    # The longest a grant may live; a longer ``expires_in`` is refused.
    grant_max_seconds: int = 24 * 3600


@dataclass(frozen=True)
class PolicySet:
    """Roles, bindings (principal id or glob → role names) and settings: one stored document."""

    roles: Mapping[str, Role]
    bindings: Mapping[str, tuple[str, ...]]
    settings: PolicySettings = field(default_factory=PolicySettings)
    # The config's break-glass administrators (exact principal ids): decided before any
    # stored role, so no stored deny rule, however broad its binding, can lock them out.
    # Never stored; only the replica's effective policy carries them.
    break_glass: frozenset[str] = frozenset()

    def roles_of(self, principal: Principal) -> tuple[str, ...]:
        """Role names bound to the principal, exactly or through a glob entry, sorted, unique."""
        return self._binding_index.roles_of(principal.id)

    @cached_property
    def _binding_index(self) -> BindingIndex:
        # Built once per document (a PolicySet never changes): decisions then cost a dict lookup
        # and a few glob matches, not a pass over every binding.
        return BindingIndex(self.bindings)


class BindingIndex:
    """Bindings by exact principal id, and globs by their literal prefix (the text before the
    first wildcard): a glob can only match ids that start with its prefix, so a lookup tries
    the id's own prefixes (one dict probe each) and matches only the globs filed under them."""

    def __init__(self, bindings: Mapping[str, Sequence[str]]) -> None:
        self._exact: dict[str, tuple[str, ...]] = {}
        self._globs: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        for pattern, names in bindings.items():
            if _is_glob(pattern):
                prefix = _GLOB_START.split(pattern, maxsplit=1)[0]
                self._globs.setdefault(prefix, []).append((pattern, tuple(names)))
            else:
                self._exact[pattern] = tuple(names)
        self._prefix_lengths = sorted({len(p) for p in self._globs})

    def roles_of(self, principal_id: str) -> tuple[str, ...]:
        found: set[str] = set(self._exact.get(principal_id, ()))
        for length in self._prefix_lengths:
            if length > len(principal_id):
                break
            for pattern, names in self._globs.get(principal_id[:length], ()):
                if fnmatchcase(principal_id, pattern):
                    found.update(names)
        return tuple(sorted(found))


_GLOB_START = re.compile(r"[*?\[]")


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


# -- grants -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """Some operations on one key for one grantee, until ``expires_at``.

    ``context_equals``: the context must be exactly this. ``context_subset``: the
    context must contain these pairs (and may carry more). At most one is set.
    """

    id: str
    key: str
    grantee: str
    operations: tuple[str, ...]
    created_at: datetime
    expires_at: datetime
    granter: str
    context_equals: Mapping[str, str] | None = None
    context_subset: Mapping[str, str] | None = None

    def expired(self, now: datetime) -> bool:
        return now >= self.expires_at

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "grantee": self.grantee,
            "operations": list(self.operations),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "granter": self.granter,
            "context_equals": dict(self.context_equals) if self.context_equals is not None else None,
            "context_subset": dict(self.context_subset) if self.context_subset is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Grant:
        equals, subset = data.get("context_equals"), data.get("context_subset")
        return cls(
            id=str(data["id"]),
            key=str(data["key"]),
            grantee=str(data["grantee"]),
            operations=tuple(str(op) for op in data["operations"]),
            created_at=parse_iso(str(data["created_at"])),
            expires_at=parse_iso(str(data["expires_at"])),
            granter=str(data["granter"]),
            context_equals=dict(equals) if equals is not None else None,
            context_subset=dict(subset) if subset is not None else None,
        )


GRANT_TOKEN_PREFIX = "kbg1."  # noqa: S105 - a format marker, not a secret


def grant_token(grant: Grant) -> str:
    """Names a grant without its holder having to know the key: what ``grants retire --token`` takes.

    Not a secret: using a grant takes the grantee's certificate, never the token.
    """
    return f"{GRANT_TOKEN_PREFIX}{grant.key}.{grant.id}"


def parse_grant_token(token: str) -> tuple[str, str]:
    """(key, grant id) from a grant token; ValueError if it is not one."""
    key, dot, grant_id = token.removeprefix(GRANT_TOKEN_PREFIX).rpartition(".")
    if not token.startswith(GRANT_TOKEN_PREFIX) or not dot or not key or not grant_id:
        raise ValueError(f"not a grant token ({GRANT_TOKEN_PREFIX}<key>.<grant id>): {shown(token)}")
    return key, grant_id


# -- decisions --------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyFacts:
    """What the engine may know of a key: never material, never state."""

    name: str
    backend: str
    environment: str
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AccessRequest:
    principal: Principal
    operation: str
    key: KeyFacts | None = None
    context: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Decision:
    """The answer, the rule (``role[index]`` or the rule's id) or grant that gave it, and why."""

    allowed: bool
    operation: str
    reason: str
    roles: tuple[str, ...] = ()
    rule: str | None = None
    grant: str | None = None
    # Rules that name the operation but did not match, each with why: what `explain` shows.
    near_misses: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "operation": self.operation,
            "reason": self.reason,
            "roles": list(self.roles),
            "rule": self.rule,
            "grant": self.grant,
            "near_misses": list(self.near_misses),
        }
