"""Who may do what, until the policy engine exists.

Interim rule (issue 4 replaces it with role policies, bindings and grants): key
management and key metadata are for the principals listed in
``server.administrators``; cryptographic operations are open to any principal
holding a certificate the broker's CA issued in its trust domain. An empty
administrator list means nobody manages keys: the default refuses.
"""

from __future__ import annotations

from aiohttp import web

from broker.api.keys import PRINCIPAL, SETTINGS
from broker.errors import Forbidden
from broker.policy.model import Principal


def principal(request: web.Request) -> Principal:
    found: Principal = request[PRINCIPAL]
    return found


def is_admin(request: web.Request) -> bool:
    return principal(request).id in request.app[SETTINGS].server.administrators


def authorize(request: web.Request, operation: str, key: str | None) -> None:
    """Refuse with 403 unless the caller may perform ``operation`` (on ``key``).

    POLICY: this is where the policy engine's decision goes (issue 4): it will take
    the principal, its roles, the operation, the key's metadata, the context and
    grants, and return allow/deny with the deciding rule.
    """
    if operation in CRYPTO_OPERATIONS:
        return
    if not is_admin(request):
        target = f" on key {key}" if key else ""
        raise Forbidden(f"{operation}{target} is denied: key management needs the administrator role")


CRYPTO_OPERATIONS = frozenset({"encrypt", "decrypt", "datakey", "rewrap", "sign", "verify"})
