"""``/v1/keys/{name}/grants``: time-limited, context-constrained rights for one principal on one key.

A grant needs ``grant.create`` on the key, an expiry (``expires_in``, at most the
policy's ``grant_max_expires_in``) and cannot give more than the granter's own
rules allow, as stored in Vault at that moment. Each use is decided against the
granter's rules again (see :mod:`broker.policy.engine`), so a grant never gives more
than its granter could do with that exact request, now. Key custodians revoke grants
(``grant.revoke``); a grantee retires its own. Changes are in Vault at once, so every
replica honours them immediately.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Any

from aiohttp import web

from broker.api import schemas
from broker.api.authz import denied_bare, facts, find_key, key_for, may_know, principal, record
from broker.api.idempotency import idempotent, keeps_no_records
from broker.api.state import GRANTS, IDEMPOTENCY, KEYS, POLICIES
from broker.errors import BadRequest, Forbidden, NotFound
from broker.keys.model import check_name
from broker.policy import engine
from broker.policy.model import (
    GRANT_RETIRE,
    GRANTABLE,
    AccessRequest,
    Grant,
    grant_token,
    principal_from_id,
)
from broker.printable import shown
from broker.state.grants import GrantAsk
from broker.timeutil import parse_duration

# What new_grant_id makes; checked before any lookup, so the answer tells nothing about keys.
_GRANT_ID = re.compile(r"g-[0-9a-f]{20}")


def _grant_id(request: web.Request) -> str:
    value = request.match_info["grant_id"]
    if _GRANT_ID.fullmatch(value) is None:
        raise BadRequest("a grant id is 'g-' and 20 hex digits")
    return value


def _operations(body: dict[str, Any]) -> tuple[str, ...]:
    raw = body.get("operations")
    if not isinstance(raw, list) or not raw or not all(isinstance(o, str) for o in raw):
        raise BadRequest(f"'operations' is required: a list from {', '.join(sorted(GRANTABLE))}")
    out: set[str] = set()
    for pattern in raw:
        matched = {op for op in GRANTABLE if fnmatchcase(op, pattern)}
        if not matched:
            raise BadRequest(
                f"{shown(pattern)} cannot be granted; grants carry only {', '.join(sorted(GRANTABLE))}"
            )
        out |= matched
    return tuple(sorted(out))


def _constraint(body: dict[str, Any], name: str) -> dict[str, str] | None:
    if body.get(name) is None:
        return None
    return schemas.context({"context": body[name]})


async def create_grant(request: web.Request) -> web.Response:
    key = await key_for(request, "grant.create", check_name(request.match_info["name"]))
    body = await schemas.json_object(request)
    try:
        grantee = principal_from_id(schemas.string(body, "grantee", required=True)).id
    except ValueError as exc:
        raise BadRequest(f"'grantee': {exc}") from None
    ask = GrantAsk(
        grantee=grantee,
        operations=_operations(body),
        expires_in=parse_duration(body.get("expires_in")),
        context_equals=_constraint(body, "context_equals"),
        context_subset=_constraint(body, "context_subset"),
    )

    async def issue() -> web.Response:
        grant = await request.app[GRANTS].issue(
            ask, granter=principal(request), key=facts(key), policy=await request.app[POLICIES].fresh()
        )
        return web.json_response(
            {"grant_id": grant.id, "grant_token": grant_token(grant), **grant.to_json()}, status=201
        )

    # A retried create (Idempotency-Key) gets the first grant, not a second one.
    return await idempotent(request, request.app[IDEMPOTENCY], "grant.create", key.name, body, issue)


async def list_grants(request: web.Request) -> web.Response:
    key = await key_for(request, "grant.list", check_name(request.match_info["name"]))
    grants = await request.app[GRANTS].for_key(key.name)
    return web.json_response({"grants": [g.to_json() for g in grants]})


@keeps_no_records
async def revoke_grant(request: web.Request) -> web.Response:
    grant_id = _grant_id(request)
    key = await key_for(request, "grant.revoke", check_name(request.match_info["name"]))
    removed = await request.app[GRANTS].remove(key.name, grant_id)
    return web.json_response({"revoked": removed.to_json()})


@keeps_no_records
async def retire_grant(request: web.Request) -> web.Response:
    """The grantee gives its grant back; nobody else may (custodians revoke instead)."""
    grant_id = _grant_id(request)
    key = await find_key(request, GRANT_RETIRE, check_name(request.match_info["name"]))
    store = request.app[GRANTS]
    try:
        grant: Grant | None = await store.get(key.name, grant_id)
    except NotFound:
        grant = None  # answered like someone else's grant: no probing for grant ids
    decision = engine.decide(
        request.app[POLICIES].current().effective,
        AccessRequest(principal(request), GRANT_RETIRE, facts(key)),
        now=request.app[KEYS].now(),
        grant_to_retire=grant,
    )
    record(request, decision)
    if not decision.allowed:
        # Like any denial: explained only to a caller that may know the key exists.
        if await may_know(request, key):
            raise Forbidden(f"{GRANT_RETIRE} of grant {grant_id} is denied: {decision.reason}")
        raise Forbidden(denied_bare(GRANT_RETIRE, key.name))
    assert grant is not None  # noqa: S101 - the engine allows retiring only an existing grant
    removed = await store.remove(key.name, grant.id)
    return web.json_response({"retired": removed.to_json()})


def add_grant_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/keys/{name}/grants", create_grant)
    r.add_get("/v1/keys/{name}/grants", list_grants)
    r.add_delete("/v1/keys/{name}/grants/{grant_id}", revoke_grant)
    r.add_post("/v1/keys/{name}/grants/{grant_id}/retire", retire_grant)
