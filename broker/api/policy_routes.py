"""``/v1/policies`` and ``/v1/bindings``: role policies, principal → role bindings, explain.

Every write is validated whole before anything is stored, and stored check-and-set:
an invalid document, or one based on a version someone has since replaced, changes
nothing. Whatever a write keeps (the bindings of a roles-only document, the roles of
a bindings change) is taken from Vault inside the check-and-set loop, never from this
replica's cache. Reads come from Vault too, and say so when the stored document is
invalid. Changing bindings needs ``binding.write`` on top of ``policy.write``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from broker.api import schemas
from broker.api.authz import authorize, facts, key_for, policy_invalid_reason
from broker.api.idempotency import idempotent, keeps_no_records
from broker.api.state import GRANTS, IDEMPOTENCY, KEYS, POLICIES
from broker.errors import BadRequest, Conflict, NotFound
from broker.keys.model import check_name
from broker.policy import engine
from broker.policy.document import (
    ROLE_NAME_RE,
    PolicyInvalid,
    parse_role_json,
    role_to_json,
    to_document,
)
from broker.policy.model import OPERATIONS, AccessRequest, Decision, principal_from_id
from broker.printable import shown
from broker.state.policies import Snapshot, Stored


class InvalidPolicy(BadRequest):
    code = "invalid_policy"
    title = "Invalid policy"


# A problem quotes the document's values (document.py): bounded here, so that one request cannot
# make a megabyte error (and audit record) out of its own body.
_MAX_PROBLEMS = 20
_MAX_PROBLEM_CHARS = 300


def _problems(exc: PolicyInvalid) -> str:
    shown = [str(p) for p in exc.problems[:_MAX_PROBLEMS]]
    parts = [p if len(p) <= _MAX_PROBLEM_CHARS else p[:_MAX_PROBLEM_CHARS] + "..." for p in shown]
    if len(exc.problems) > _MAX_PROBLEMS:
        parts.append(f"and {len(exc.problems) - _MAX_PROBLEMS} more problems")
    return "; ".join(parts)


def _checked(build: Callable[[], Any]) -> Any:
    try:
        return build()
    except PolicyInvalid as exc:
        raise InvalidPolicy(_problems(exc)) from None


def _role_name(request: web.Request) -> str:
    """The ``{role}`` of the path, refused (400) unless it follows the role-name rule."""
    name = request.match_info["role"]
    if ROLE_NAME_RE.fullmatch(name) is None:
        raise BadRequest("a role name is 1-63 characters of a-z, 0-9 and '-', starting with a letter")
    return name


def _mapping(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _invalid_fields(stored: Stored) -> dict[str, Any]:
    """Added to a read of an invalid stored document, so that no client mistakes it for one in force."""
    if not stored.invalid:
        return {}
    return {
        "invalid": (
            "the stored policy document is invalid: only the break-glass administrators can act "
            "until a valid one is stored"
        ),
        "problems": list(stored.problems),
    }


async def _stored(request: web.Request) -> Stored:
    # Reads that a client may base a change on come from Vault, not this replica's cache:
    # the client sends back the version it read, and it must be the stored one.
    return await request.app[POLICIES].stored()


def _reply(snap: Snapshot) -> web.Response:
    return web.json_response({"version": snap.version, "document": to_document(snap.policy)})


async def get_document(request: web.Request) -> web.Response:
    await authorize(request, "policy.read")
    stored = await _stored(request)
    store = request.app[POLICIES]
    return web.json_response(
        {"version": stored.version, "document": stored.document(store.defaults), **_invalid_fields(stored)}
    )


async def put_document(request: web.Request) -> web.Response:
    """Replace the whole document; without ``bindings`` in it, the stored bindings are kept."""
    await authorize(request, "policy.write")
    body = await schemas.json_object(request)
    document = body.get("document")
    if not isinstance(document, dict):
        raise BadRequest("'document' is required (an object: roles, optional bindings and settings)")
    version = schemas.integer(body, "version")
    if "bindings" in document:
        await authorize(request, "binding.write")

    def build(stored: Stored) -> dict[str, Any]:
        data = dict(document)
        if "bindings" not in data:
            # Kept from the document as stored now (even an invalid one), never from a cache.
            kept = stored.bindings()
            if kept is None:
                raise Conflict(
                    "the stored document's bindings cannot be read (not a mapping), so they cannot be "
                    "kept; send the bindings you want in the document (needs binding.write)"
                )
            data["bindings"] = kept
        return data

    async def write() -> web.Response:
        return _reply(await _write(request, build, version))

    # A retried apply (Idempotency-Key) gets the first answer instead of a version conflict.
    return await idempotent(request, request.app[IDEMPOTENCY], "policy.write", "", body, write)


async def get_role(request: web.Request) -> web.Response:
    await authorize(request, "policy.read")
    name = _role_name(request)
    stored = await _stored(request)
    if stored.policy is None:
        raw = _mapping(_mapping(stored.raw).get("roles")).get(name)
        if raw is None:
            raise NotFound(f"no role named {name!r}")
        return web.json_response({"name": name, **_mapping(raw), **_invalid_fields(stored)})
    role = stored.policy.roles.get(name)
    if role is None:
        raise NotFound(f"no role named {name!r}")
    return web.json_response({"name": name, **role_to_json(role)})


@keeps_no_records
async def put_role(request: web.Request) -> web.Response:
    await authorize(request, "policy.write")
    name = request.match_info["role"]  # checked with the body, as invalid_policy
    body = await schemas.json_object(request)
    body.pop("name", None)
    _checked(lambda: parse_role_json(name, body))

    def build(stored: Stored) -> dict[str, Any]:
        doc = stored.base(request.app[POLICIES].defaults)
        return {**doc, "roles": {**_mapping(doc.get("roles")), name: body}}

    snap = await _write(request, build)
    return web.json_response({"name": name, "version": snap.version, **role_to_json(snap.policy.roles[name])})


@keeps_no_records
async def delete_role(request: web.Request) -> web.Response:
    await authorize(request, "policy.write")
    name = _role_name(request)
    snap = await _validated(request.app[POLICIES].delete_role(name))
    return web.json_response({"deleted": name, "version": snap.version})


async def get_bindings(request: web.Request) -> web.Response:
    await authorize(request, "binding.read")
    stored = await _stored(request)
    return web.json_response(
        {"version": stored.version, "bindings": stored.bindings() or {}, **_invalid_fields(stored)}
    )


@keeps_no_records
async def put_bindings(request: web.Request) -> web.Response:
    """Replace every binding. With ``version``, only if the document is still at that version."""
    await authorize(request, "binding.write")
    body = await schemas.json_object(request)
    bindings = body.get("bindings")
    if not isinstance(bindings, dict):
        raise BadRequest("'bindings' is required: an object of principal id (or glob) → list of roles")
    version = schemas.integer(body, "version")

    def build(stored: Stored) -> dict[str, Any]:
        # Roles and settings as stored now; the new bindings are validated against those roles.
        return {**stored.base(request.app[POLICIES].defaults), "bindings": bindings}

    snap = await _write(request, build, version)
    return web.json_response({"version": snap.version, "bindings": to_document(snap.policy)["bindings"]})


async def _write(
    request: web.Request, build: Callable[[Stored], Mapping[str, Any]], version: int | None = None
) -> Snapshot:
    """Merge into the document as stored now (re-read, validated whole, check-and-set, retried)."""
    return await _validated(request.app[POLICIES].write(build, version))


async def _validated(write: Awaitable[Snapshot]) -> Snapshot:
    """A policy write whose result does not validate is the caller's 400, naming every problem."""
    try:
        return await write
    except PolicyInvalid as exc:
        raise InvalidPolicy(_problems(exc)) from None


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
        raise BadRequest(f"unknown operation {shown(operation)} (known: {', '.join(sorted(OPERATIONS))})")
    key_name = schemas.string(body, "key") or None
    context = schemas.context(body) if "context" in body else None
    # Explaining a decision on a key shows its facts (near misses name its backend, environment,
    # tags): only for a caller that may read the key; anyone else gets the 403 a missing key gets.
    key = await key_for(request, "key.read", check_name(key_name, "'key'")) if key_name else None
    grants = [g for g in await request.app[GRANTS].for_key(key.name) if g.grantee == who.id] if key else []
    store = request.app[POLICIES]
    snapshot = store.current()
    if snapshot.invalid and not store.is_break_glass(who.id):
        # Not "bound to no role": the bindings may be fine; the document as a whole is not in force.
        decision = Decision(False, operation, policy_invalid_reason(snapshot.invalid))
        extra = {"policy_invalid": snapshot.invalid}
    else:
        decision = engine.decide(
            snapshot.effective,
            AccessRequest(who, operation, facts(key) if key else None, context),
            grants,
            now=request.app[KEYS].now(),
        )
        extra = {}
    return web.json_response({"principal": who.id, "key": key_name, **decision.to_json(), **extra})


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
