"""The role table of ARCHITECTURE.md, written out independently of config/policies.yaml.

Both the engine's unit tests and the real-stack matrix compare what the shipped
policy decides with this table, so a drift in either one fails a test.
"""

from __future__ import annotations

ROLES = (
    "administrator",
    "data-engineer",
    "security-analyst",
    "developer",
    "compliance-officer",
    "application",
)
ENVIRONMENTS = ("dev", "staging", "prod")
BACKENDS = ("vault", "kms", "hsm")
CRYPTO = frozenset(
    {"crypto.encrypt", "crypto.decrypt", "crypto.datakey", "crypto.rewrap", "crypto.sign", "crypto.verify"}
)
READ_KEYS = frozenset({"key.read", "key.list"})

_PLAIN = {
    "data-engineer": {"key.create", "key.rotate", "sys.health"}
    | READ_KEYS
    | {"crypto.encrypt", "crypto.decrypt", "crypto.datakey", "crypto.rewrap"},
    "security-analyst": READ_KEYS | {"audit.read", "audit.verify", "sys.health", "sys.metrics"},
    "developer": READ_KEYS | {"sys.health"},
    "compliance-officer": READ_KEYS | {"audit.read", "audit.verify", "sys.health"},
    "application": {"sys.health"},
}


def expected(role: str, operation: str, environment: str, *, tagged_for_caller: bool = True) -> bool:
    """May a principal holding only ``role`` do ``operation`` on a key in ``environment``?

    ``tagged_for_caller``: the key carries the tag app=<the caller's name> (what the
    application role's default rule selects).
    """
    if role == "administrator":
        return True
    if role == "developer" and operation in CRYPTO:
        return environment in ("dev", "staging")
    if role == "application" and (operation in CRYPTO or operation == "key.read"):
        return tagged_for_caller
    return operation in _PLAIN[role]
