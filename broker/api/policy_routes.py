"""``/v1/policies`` and ``/v1/bindings``: role policies, principal → role bindings, explain.

Every write is validated whole before anything is stored, and stored check-and-set:
an invalid document, or one based on a version someone has since replaced, changes
nothing. Changing bindings needs ``binding.write`` on top of ``policy.write``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from broker.api import schemas
from broker.api.authz import authorize, facts
from broker.api.keys import GRANTS, KEYS, POLICIES
from broker.errors import BadRequest, Conflict, NotFound
from broker.policy import engine
from broker.policy.document import (
    ROLE_NAME_RE,
    PolicyInvalid,
    parse_bindings_json,
    parse_document,
    parse_role_json,
    role_to_json,
    to_document,
)
from broker.policy.model import OPERATIONS, AccessRequest, PolicySet, principal_from_id
from broker.state.policies import Snapshot


class InvalidPolicy(BadRequest):
    code = "invalid_policy"
    title = "Invalid policy"


def _checked(build: Callable[[], Any]) -> Any:
    try:
        return build()
    except PolicyInvalid as exc:
        raise InvalidPolicy("; ".join(str(p) for p in exc.problems)) from None


def _role_name(request: web.Request) -> str:
    """The ``{role}`` of the path, refused (400) unless it follows the role-name rule."""
    name = request.match_info["role"]
    if ROLE_NAME_RE.fullmatch(name) is None:
        raise BadRequest("a role name is 1-63 characters of a-z, 0-9 and '-', starting with a letter")
    return name


def _document_reply(snap: Snapshot) -> web.Response:
    return web.json_response({"version": snap.version, "document": to_document(snap.policy)})


async def get_document(request: web.Request) -> web.Response:
    await authorize(request, "policy.read")
    return _document_reply(request.app[POLICIES].current())


async def put_document(request: web.Request) -> web.Response:
    """Replace the whole document; without ``bindings`` in it, the stored bindings are kept."""
    await authorize(request, "policy.write")
    body = await schemas.json_object(request)
    document = body.get("document")
    if not isinstance(document, dict):
        raise BadRequest("'document' is required (an object: roles, optional bindings and settings)")
    version = schemas.integer(body, "version")
    store = request.app[POLICIES]
    data = dict(document)
    if "bindings" in data:
        await authorize(request, "binding.write")
    else:
        data["bindings"] = to_document(store.current().policy)["bindings"]
    policy: PolicySet = _checked(lambda: parse_document(data))
    return _document_reply(await store.replace_document(policy, version))


async def get_role(request: web.Request) -> web.Response:
    await authorize(request, "policy.read")
    name = _role_name(request)
    role = request.app[POLICIES].current().policy.roles.get(name)
    if role is None:
        raise NotFound(f"no role named {name!r}")
    return web.json_response({"name": name, **role_to_json(role)})


async def put_role(request: web.Request) -> web.Response:
    await authorize(request, "policy.write")
    name = request.match_info["role"]  # checked with the body, as invalid_policy
    body = await schemas.json_object(request)
    body.pop("name", None)
    _checked(lambda: parse_role_json(name, body))

    def edit(doc: dict[str, Any]) -> Mapping[str, Any]:
        return {**doc, "roles": {**doc["roles"], name: body}}

    snap = await _change(request, edit)
    return web.json_response({"name": name, "version": snap.version, **role_to_json(snap.policy.roles[name])})


async def delete_role(request: web.Request) -> web.Response:
    await authorize(request, "policy.write")
    name = _role_name(request)

    def edit(doc: dict[str, Any]) -> Mapping[str, Any]:
        if name not in doc["roles"]:
            raise NotFound(f"no role named {name!r}")
        bound = sorted(p for p, roles in doc["bindings"].items() if name in roles)
        if bound:
            raise Conflict(f"role {name} is still bound to {', '.join(bound)}; change those bindings first")
        if len(doc["roles"]) == 1:
            raise Conflict(f"role {name} is the last role; a policy needs at least one")
        return {**doc, "roles": {k: v for k, v in doc["roles"].items() if k != name}}

    snap = await _change(request, edit)
    return web.json_response({"deleted": name, "version": snap.version})


async def get_bindings(request: web.Request) -> web.Response:
    await authorize(request, "binding.read")
    snap = request.app[POLICIES].current()
    return web.json_response({"version": snap.version, "bindings": to_document(snap.policy)["bindings"]})


async def put_bindings(request: web.Request) -> web.Response:
    """Replace every binding. With ``version``, only if the document is still at that version."""
    await authorize(request, "binding.write")
    body = await schemas.json_object(request)
    bindings = body.get("bindings")
    if not isinstance(bindings, dict):
        raise BadRequest("'bindings' is required: an object of principal id (or glob) → list of roles")
    version = schemas.integer(body, "version")
    store = request.app[POLICIES]
    if version is not None:
        current = store.current().policy
        parsed = _checked(lambda: parse_bindings_json(bindings, current.roles))
        snap = await store.replace_document(PolicySet(current.roles, parsed, current.settings), version)
    else:
        snap = await _change(request, lambda doc: {**doc, "bindings": bindings})
    return web.json_response({"version": snap.version, "bindings": to_document(snap.policy)["bindings"]})


async def _change(request: web.Request, edit: Callable[[dict[str, Any]], Mapping[str, Any]]) -> Snapshot:
    """Edit the latest stored document (re-read, validated whole, check-and-set)."""
    try:
        return await request.app[POLICIES].change(edit)
    except PolicyInvalid as exc:
        raise InvalidPolicy("; ".join(str(p) for p in exc.problems)) from None


async def explain(request: web.Request) -> web.Response:
    """POST /v1/policies/explain: what the engine would decide for another principal, and why."""
    await authorize(request, "policy.read")
    body = await schemas.json_object(request)
    try:
        who = principal_from_id(schemas.string(body, "principal", required=True))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    operation = schemas.string(body, "operation", required=True)
    if operation not in OPERATIONS:
        raise BadRequest(f"unknown operation {operation!r} (known: {', '.join(sorted(OPERATIONS))})")
    key_name = schemas.string(body, "key") or None
    context = schemas.context(body) if "context" in body else None
    key = await request.app[KEYS].get(key_name) if key_name else None
    grants = [g for g in await request.app[GRANTS].for_key(key.name) if g.grantee == who.id] if key else []
    decision = engine.decide(
        request.app[POLICIES].current().effective,
        AccessRequest(who, operation, facts(key) if key else None, context),
        grants,
        now=request.app[KEYS].now(),
    )
    return web.json_response({"principal": who.id, "key": key_name, **decision.to_json()})


def add_policy_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/policies", get_document)
    r.add_put("/v1/policies", put_document)
    r.add_post("/v1/policies/explain", explain)
    r.add_get("/v1/policies/{role}", get_role)
    r.add_put("/v1/policies/{role}", put_role)
    r.add_delete("/v1/policies/{role}", delete_role)
    r.add_get("/v1/bindings", get_bindings)
    r.add_put("/v1/bindings", put_bindings)
