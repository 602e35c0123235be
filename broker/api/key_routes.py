"""``/v1/keys…``: key management and cryptographic operations.

Each handler checks the key name in the path against the name rule (400
``invalid_key_name`` before any lookup), authorizes (:mod:`broker.api.authz`, before any
backend call), reads and checks its input, then calls
:class:`broker.keys.service.KeyService`. Crypto endpoints take ``{"batch": [...]}`` and
answer per item, so one bad item does not fail the rest. A crypto caller learns what is
wrong with its body only once it is known to have some right on the key: anyone else
gets the same 403 whether the key exists or not, whatever it sends.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from aiohttp import web

from broker.api import list_cursor, schemas
from broker.api.authz import (
    audit_facts,
    authorize,
    authorize_some_key,
    decide,
    denied_bare,
    find_key,
    key_for,
    may_know,
    principal,
    tag_change_guard,
)
from broker.api.idempotency import idempotent
from broker.api.state import AUDIT_HMAC_KEY, IDEMPOTENCY, KEYS, PRINCIPAL, SETTINGS
from broker.errors import BadRequest, BrokerError, Forbidden
from broker.keys.model import Key, check_name
from broker.keys.service import KeyService, NewKey, digest_of
from broker.policy.model import KeyFacts
from broker.printable import shown
from broker.vocab import Backend, KeyType

T = TypeVar("T")
R = TypeVar("R")
ItemHandler = Callable[[web.Request, Key, dict[str, Any]], Awaitable[dict[str, Any]]]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _service(request: web.Request) -> KeyService:
    return request.app[KEYS]


def _path_name(request: web.Request) -> str:
    """The ``{name}`` of the path, refused (400) unless it follows the name rule."""
    return check_name(request.match_info["name"])


def _enum(value: str, kind: type[Backend] | type[KeyType], field: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(str(m) for m in kind)
        raise BadRequest(f"'{field}' must be one of {choices}, not {shown(value)}") from None


# -- key management ---------------------------------------------------------------------


async def create_key(request: web.Request) -> web.Response:
    # Before the body is read: a caller that may create no key at all gets its 403 at once,
    # whatever (and however much) it sends.
    await authorize_some_key(request, "key.create")
    body = await schemas.json_object(request)
    name = check_name(schemas.string(body, "name", required=True), "'name'")
    spec = NewKey(
        name=name,
        backend=_enum(schemas.string(body, "backend", required=True), Backend, "backend"),
        type=_enum(schemas.string(body, "type", default=KeyType.AES256_GCM), KeyType, "type"),
        environment=schemas.string(body, "environment", required=True),
        rotation_period_seconds=schemas.duration(body, "rotation_period"),
        deletion_protection=schemas.boolean(body, "deletion_protection", True),
        tags=schemas.tags(body),
        description=schemas.text(body, "description", max_length=schemas.MAX_DESCRIPTION),
    )
    facts = audit_facts(request)
    facts.key, facts.backend = spec.name, str(spec.backend)
    await authorize(
        request, "key.create", KeyFacts(spec.name, str(spec.backend), spec.environment, dict(spec.tags or {}))
    )

    async def create() -> web.Response:
        key = await _service(request).create(spec, owner=principal(request).id)
        return web.json_response(key.public(), status=201, headers={"Location": f"/v1/keys/{key.name}"})

    return await idempotent(request, request.app[IDEMPOTENCY], "key.create", spec.name, body, create)


# A page of a listing: at most this many keys (each one a Vault read).
MAX_LIST_LIMIT = 1000


def _list_limit(query: Any) -> int | None:
    raw = query.get("limit")
    if raw is None:
        return None
    # ASCII digits only: int() would also take " 10", "1_0" and non-ASCII digits.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise BadRequest(f"'limit' must be an integer between 1 and {MAX_LIST_LIMIT}")
    return int(raw)


async def list_keys(request: web.Request) -> web.Response:
    """Only the keys the caller may read are listed (by its rules; grants do not widen a listing).

    ``limit`` pages the listing in name order; ``after`` continues it: the ``next`` of the
    previous page (a sealed cursor, :mod:`broker.api.list_cursor`: a page can end on a key the
    caller may not read, whose name it must not learn) or a key name.
    """
    await authorize(request, "key.list")
    filters = {f: request.query[f] for f in ("backend", "state", "environment", "tag") if f in request.query}
    limit = _list_limit(request.query)
    secret, caller = request.app[AUDIT_HMAC_KEY], str(request[PRINCIPAL].id)
    after = request.query.get("after")
    if after is not None:
        if list_cursor.is_cursor(after):
            after = list_cursor.open_cursor(secret, caller, filters, after)
        else:
            check_name(after, "'after'")

    async def readable(key: Key) -> bool:
        return (await decide(request, "key.read", key, with_grants=False)).allowed

    keys, after_last = await _service(request).list_keys(filters, after=after, limit=limit, visible=readable)
    following = None if after_last is None else list_cursor.seal(secret, caller, filters, after_last)
    return web.json_response({"keys": [k.public() for k in keys], "next": following})


async def show_key(request: web.Request) -> web.Response:
    key = await key_for(request, "key.read", _path_name(request))
    return web.json_response(key.public())


async def patch_key(request: web.Request) -> web.Response:
    name = (await key_for(request, "key.update", _path_name(request))).name
    body = await schemas.json_object(request)
    known = {"rotation_period", "description", "tags", "deletion_protection", "min_decrypt_version"}
    unknown = sorted(set(body) - known)
    if unknown:
        named = ", ".join(shown(u) for u in unknown[:3]) + (
            f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        )
        raise BadRequest(f"cannot change {named} (changeable: {', '.join(sorted(known))})")
    changes: dict[str, Any] = {}
    if "rotation_period" in body:
        changes["rotation_period_seconds"] = schemas.duration(body, "rotation_period")
    if "description" in body:
        changes["description"] = schemas.text(body, "description", max_length=schemas.MAX_DESCRIPTION)
    if "tags" in body:
        changes["tags"] = schemas.tags(body) or {}
    if "deletion_protection" in body:
        changes["deletion_protection"] = schemas.boolean(body, "deletion_protection", True)
    if "min_decrypt_version" in body:
        changes["min_decrypt_version"] = schemas.integer(body, "min_decrypt_version", required=True)

    async def patch() -> web.Response:
        # A change of the facts rules select keys by (tags) is decided again on the key as it would be.
        key = await _service(request).patch(name, changes, guard=tag_change_guard(request))
        return web.json_response(key.public())

    return await idempotent(request, request.app[IDEMPOTENCY], "key.update", name, body, patch)


def _lifecycle(operation: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        name = (await key_for(request, f"key.{operation}", _path_name(request))).name
        body = await schemas.json_object(request)
        service = _service(request)
        # The body is checked before an Idempotency-Key record is taken: a bad body leaves none.
        reason = schemas.string(body, "reason", required=True) if operation == "revoke" else ""
        days = schemas.integer(body, "pending_days") if operation == "schedule-destruction" else None

        async def change() -> web.Response:
            if operation == "rotate":
                key = await service.rotate(name)
            elif operation == "suspend":
                key = await service.suspend(name)
            elif operation == "resume":
                key = await service.resume(name)
            elif operation == "revoke":
                key = await service.revoke(name, reason)
            elif operation == "schedule-destruction":
                key = await service.schedule_destruction(name, 30 if days is None else days)
            else:
                key = await service.cancel_destruction(name)
            audit_facts(request).version = key.latest.number if key.versions else None
            return web.json_response(key.public())

        return await idempotent(request, request.app[IDEMPOTENCY], f"key.{operation}", name, body, change)

    handler.__name__ = operation.replace("-", "_")
    return handler


# -- cryptography -----------------------------------------------------------------------


async def _encrypt(request: web.Request, key: Key, item: dict[str, Any]) -> dict[str, Any]:
    sealed = await _service(request).encrypt(key, schemas.plaintext(item), schemas.context(item))
    return {"ciphertext": sealed.encoded, "key_version": sealed.version}


async def _decrypt(request: web.Request, key: Key, item: dict[str, Any]) -> dict[str, Any]:
    text = schemas.string(item, "ciphertext", required=True)
    data = await _service(request).decrypt(key, text, schemas.context(item))
    return {"plaintext": _b64(data)}


async def _datakey(request: web.Request, key: Key, item: dict[str, Any]) -> dict[str, Any]:
    nbytes = schemas.integer(item, "bytes")
    include = schemas.boolean(item, "include_plaintext", True)
    data, sealed = await _service(request).data_key(
        key, 32 if nbytes is None else nbytes, schemas.context(item)
    )
    out: dict[str, Any] = {"ciphertext": sealed.encoded, "key_version": sealed.version}
    if include:
        out["plaintext"] = _b64(data)
    return out


async def _rewrap(request: web.Request, key: Key, item: dict[str, Any]) -> dict[str, Any]:
    text = schemas.string(item, "ciphertext", required=True)
    context = schemas.context(item)
    to_name = schemas.string(item, "to_key") or None
    if to_name is not None:
        check_name(to_name, "'to_key'")
    target = None
    if to_name is not None and to_name != key.name:
        audit_facts(request).other_keys.append(to_name)
        target = await find_key(request, "crypto.encrypt", to_name)
        await authorize(request, "crypto.encrypt", target, context)
    # Whoever may revoke the key is its custodian: the one allowed to move data off a compromised key.
    custodian = (await decide(request, "key.revoke", key, with_grants=False)).allowed
    sealed = await _service(request).rewrap(key, text, context, to_key=target, admin=custodian)
    return {"ciphertext": sealed.encoded, "key_version": sealed.version, "key": (target or key).name}


def _digest(item: dict[str, Any]) -> bytes:
    algorithm = schemas.string(item, "algorithm", default="ecdsa-sha256")
    if algorithm != "ecdsa-sha256":
        raise BadRequest(f"algorithm must be ecdsa-sha256, not {shown(algorithm)}")
    return digest_of(
        schemas.b64(item, "message", required=False), schemas.b64(item, "digest", required=False)
    )


async def _sign(request: web.Request, key: Key, item: dict[str, Any]) -> dict[str, Any]:
    sealed = await _service(request).sign(key, _digest(item))
    return {"signature": sealed.encoded, "key_version": sealed.version}


async def _verify(request: web.Request, key: Key, item: dict[str, Any]) -> dict[str, Any]:
    signature = schemas.string(item, "signature", required=True)
    return {"valid": await _service(request).verify(key, _digest(item), signature)}


def _problem(exc: BrokerError) -> dict[str, Any]:
    return {"error": {"status": exc.status, "code": exc.code, "detail": exc.detail}}


async def _batched(
    items: list[dict[str, Any]],
    parse: Callable[[dict[str, Any]], T],
    send: Callable[[list[T]], Awaitable[Sequence[R | BrokerError]]],
    render: Callable[[R], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Check items one by one, send the valid ones together, answer each in its place."""
    out: list[dict[str, Any]] = [{} for _ in items]
    valid: list[T] = []
    positions = []
    for i, item in enumerate(items):
        try:
            valid.append(parse(item))
            positions.append(i)
        except BrokerError as exc:
            out[i] = _problem(exc)
    if valid:
        for i, r in zip(positions, await send(valid), strict=True):
            out[i] = _problem(r) if isinstance(r, BrokerError) else render(r)
    return out


async def _batch_encrypt(request: web.Request, key: Key, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The valid items go to the backend in one call where it batches (transit batch_input)."""
    return await _batched(
        items,
        lambda item: (schemas.plaintext(item), schemas.context(item)),
        lambda valid: _service(request).encrypt_batch(key, valid),
        lambda r: {"ciphertext": r.encoded, "key_version": r.version},
    )


async def _batch_decrypt(request: web.Request, key: Key, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return await _batched(
        items,
        lambda item: (schemas.string(item, "ciphertext", required=True), schemas.context(item)),
        lambda valid: _service(request).decrypt_batch(key, valid),
        lambda r: {"plaintext": _b64(r)},
    )


BatchHandler = Callable[[web.Request, Key, list[dict[str, Any]]], Awaitable[list[dict[str, Any]]]]


async def _run_items(
    request: web.Request, key: Key, items: list[dict[str, Any]], run: ItemHandler, batch: BatchHandler | None
) -> list[dict[str, Any]]:
    if batch is not None:
        return await batch(request, key, items)

    async def one(item: dict[str, Any]) -> dict[str, Any]:
        try:
            return await run(request, key, item)
        except BrokerError as exc:
            return _problem(exc)

    return list(await asyncio.gather(*(one(item) for item in items)))


async def _may_learn(request: web.Request, action: str, key: Key) -> None:
    """Before saying what is wrong with a body: 403, as for any denial, unless the caller
    may read the key or may use it without a context. Otherwise a 400 for a bad body
    against a 403 for a good one would tell a caller with no rights that the key exists.
    """
    if (await decide(request, "key.read", key)).allowed:
        return
    await authorize(request, action, key)


def _crypto(
    operation: str, run: ItemHandler, batch: BatchHandler | None = None
) -> Callable[[web.Request], Awaitable[web.Response]]:
    action = f"crypto.{operation}"

    async def handler(request: web.Request) -> web.Response:
        key = await find_key(request, action, _path_name(request))
        try:
            body = await schemas.json_object(request)
            items = schemas.batch_items(body, request.app[SETTINGS].keys.max_batch_items)
            context = schemas.context(body) if items is None else None
        except BrokerError:
            await _may_learn(request, action, key)
            raise
        if items is None:
            await authorize(request, action, key, context)
            answer = await run(request, key, body)
            audit_facts(request).version = answer.get("key_version")
            return web.json_response(answer)
        audit_facts(request).items = len(items)
        # Each item is decided with its own context; a denied item fails alone.
        out: list[dict[str, Any]] = [{} for _ in items]
        allowed, positions = [], []
        for i, item in enumerate(items):
            try:
                try:
                    item_context = schemas.context(item)
                except BrokerError:
                    await _may_learn(request, action, key)
                    raise
                await authorize(request, action, key, item_context)
            except BrokerError as exc:
                out[i] = _problem(exc)
                continue
            allowed.append(item)
            positions.append(i)
        if allowed:
            for i, result in zip(positions, await _run_items(request, key, allowed, run, batch), strict=True):
                out[i] = result
        elif all(o["error"]["status"] == 403 for o in out) and not await may_know(request, key):
            # Per-item 403s in a 200 would tell a caller with no right on the key that it exists:
            # it gets the one 403 a missing key gets.
            raise Forbidden(denied_bare(action, key.name))
        return web.json_response({"batch": out})

    handler.__name__ = operation
    return handler


def add_key_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/keys", create_key)
    r.add_get("/v1/keys", list_keys)
    r.add_get("/v1/keys/{name}", show_key)
    r.add_patch("/v1/keys/{name}", patch_key)
    for op in ("rotate", "suspend", "resume", "revoke", "schedule-destruction", "cancel-destruction"):
        r.add_post(f"/v1/keys/{{name}}/{op}", _lifecycle(op))
    r.add_post("/v1/keys/{name}/encrypt", _crypto("encrypt", _encrypt, _batch_encrypt))
    r.add_post("/v1/keys/{name}/decrypt", _crypto("decrypt", _decrypt, _batch_decrypt))
    for op, run in (("datakey", _datakey), ("rewrap", _rewrap), ("sign", _sign), ("verify", _verify)):
        r.add_post(f"/v1/keys/{{name}}/{op}", _crypto(op, run))
