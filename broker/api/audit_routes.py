"""``/v1/audit``: verify the chain, read the merged timeline, HMAC a value to look for,
start a new epoch after lost history.

Reading and verifying the log happens on the audit thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from aiohttp import web

from broker.api import schemas
from broker.api.authz import authorize
from broker.api.idempotency import keeps_no_records
from broker.api.state import AUDIT, AUDIT_HMAC_KEY, HSM, PRINCIPAL, SETTINGS, VAULT, WORKER
from broker.audit import chain, merge, timeline
from broker.audit.events import hmac_value
from broker.audit.segments import segment_sources
from broker.audit.signing import load_public_key, signature_checker, to_pem
from broker.backends.hsm import HsmAuditSigner
from broker.errors import BadRequest, BrokerError, Forbidden
from broker.state.anchors import VaultAnchors, anchored, epoch_notes, epochs
from broker.workers import worker_dir_name

MAX_EVENTS = 10_000
EPOCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_REASON = 1000


async def public_key(request: web.Request) -> web.Response:
    await authorize(request, "audit.verify")
    der = await _public_der(request)
    return web.Response(text=to_pem(der), content_type="application/x-pem-file")


async def _public_der(request: web.Request) -> bytes:
    signer = request.app[AUDIT].signer
    if signer is None:
        raise BadRequest("this broker signs no checkpoints")
    return await signer.public_key_der()


async def verify(request: web.Request) -> web.Response:
    """GET /v1/audit/verify: chain, signatures, Vault anchor and live head; names the first bad record.

    Under ``serve --workers`` every worker's chain is verified (``chains``), each against its
    own node's HSM key and Vault anchor; ``ok`` and ``verdict`` are the worst of them.
    """
    await authorize(request, "audit.verify")
    sink = request.app[AUDIT]
    der = await _public_der(request)
    head = sink.head()
    loop = asyncio.get_running_loop()
    files = await loop.run_in_executor(sink.executor, sink.sources)
    own = await _verify_chain(request, sink.node, der, files, live_head=head if head.seq else None)
    document = own.pop("_anchor_document")
    body: dict[str, Any] = {
        **own,
        "node": sink.node,
        "epoch": sink.epoch,
        "epochs": epochs(document),
        "public_key": to_pem(der),
    }
    worker = request.app.get(WORKER)
    if worker is not None:
        chains: list[dict[str, Any]] = [{"node": sink.node, "worker": worker[0], **own}]
        for index, node, directory in _sibling_chains(sink.directory, sink.node, worker):
            sibling_der = await HsmAuditSigner(request.app[HSM], node=node).public_key_der()
            paths = await loop.run_in_executor(None, _segment_paths, directory)
            report = await _verify_chain(
                request, node, sibling_der, segment_sources(paths), writer_running=True
            )
            report.pop("_anchor_document")
            chains.append({"node": node, "worker": index, **report})
        rank = {"intact": 0, "unverified": 1, "broken": 2}
        body["chains"] = chains
        body["ok"] = all(c["ok"] for c in chains)
        body["verdict"] = max((c["verdict"] for c in chains), key=rank.__getitem__)
    return web.json_response(body)


def _segment_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{chain.FILE_PREFIX}*{chain.FILE_SUFFIX}"))


def _sibling_chains(directory: Path, node: str, worker: tuple[int, int]) -> list[tuple[int, str, Path]]:
    """The other workers' (index, node, audit directory), named as broker.workers names them."""
    index, count = worker
    base_node = node.removesuffix(f"-w{index}")
    return [
        (j, f"{base_node}-w{j}", directory.parent / worker_dir_name(j)) for j in range(count) if j != index
    ]


async def _verify_chain(
    request: web.Request,
    node: str,
    der: bytes,
    files: Sequence[tuple[str, chain.Content]],
    *,
    live_head: chain.Anchor | None = None,
    writer_running: bool = False,
) -> dict[str, Any]:
    """One node's chain checked against its signing key(s) and its anchor in Vault (off the loop)."""
    document = await VaultAnchors(request.app[VAULT], request.app[SETTINGS].vault.kv_mount, node).read()
    checks = [signature_checker(load_public_key(der))]
    signer = request.app[AUDIT].signer
    retired = getattr(signer, "retired_public_keys_der", None)
    if retired is not None:
        # Logs written before each node had its own key were signed with the one shared key.
        checks += [signature_checker(load_public_key(k)) for k in await retired()]

    def check(digest: bytes, signature: bytes) -> bool:
        return any(c(digest, signature) for c in checks)

    report = await asyncio.get_running_loop().run_in_executor(
        None,
        lambda: chain.verify(
            files, check, anchor=anchored(document), live_head=live_head, writer_running=writer_running
        ),
    )
    report.notes.extend(epoch_notes(document))
    return {**report.to_json(), "_anchor_document": document}


@keeps_no_records
async def new_epoch(request: web.Request) -> web.Response:
    """POST /v1/audit/epoch: after lost history, continue the log in a named, recorded new epoch.

    Only a break-glass administrator may, and only while the log is stopped because its
    files do not hold Vault's anchor. The epoch's first record and Vault's anchor document
    keep who, why and which anchor it supersedes.
    """
    principal = request[PRINCIPAL]
    if principal.id not in request.app[SETTINGS].server.administrators:
        raise Forbidden("only a break-glass administrator (server.administrators) may start an audit epoch")
    body = await schemas.json_object(request)
    name = schemas.string(body, "name", required=True)
    reason = schemas.string(body, "reason", required=True).strip()
    if EPOCH_NAME.fullmatch(name) is None:
        raise BadRequest("'name' is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if not reason or len(reason) > MAX_REASON:
        raise BadRequest(f"'reason' says why, in 1-{MAX_REASON} characters")
    sink = request.app[AUDIT]
    written = await sink.begin_epoch(name, by=principal.id, reason=reason)
    return web.json_response(
        {
            "node": sink.node,
            "epoch": name,
            "anchor": {"seq": written["seq"], "hash": written["hash"]},
            "epochs": written.get("epochs", []),
        }
    )


def _filters(query: Any) -> merge.Filters:
    def moment(name: str) -> Any:
        if name not in query:
            return None
        try:
            return merge.parse_time(query[name])
        except ValueError:
            raise BadRequest(f"'{name}' must be an ISO 8601 time, e.g. 2026-11-23T10:00:00Z") from None

    source = query.get("source")
    if source not in (None, "broker", "vault", "bypass"):
        raise BadRequest("'source' is one of broker, vault, bypass")
    return merge.Filters(
        since=moment("since"),
        until=moment("until"),
        principal=query.get("principal"),
        key=query.get("key"),
        operation=query.get("operation"),
        outcome=query.get("outcome"),
        source=source,
    )


def timeline_chains(directory: Path, node: str, worker: tuple[int, int] | None) -> list[timeline.Chain]:
    """This broker's chain and, under ``serve --workers``, its sibling workers' (each row then names
    its ``chain``)."""
    if worker is None:
        return [timeline.Chain("", directory)]
    siblings = [timeline.Chain(n, d) for _, n, d in _sibling_chains(directory, node, worker)]
    return [timeline.Chain(node, directory), *siblings]


def _bad_cursor(reason: str) -> BadRequest:
    return BadRequest(
        f"'cursor' must be '{CURSOR_START}' or the 'next' value of an earlier answer ({reason})"
    )


CURSOR_START = "start"


class TimelineUnavailable(BrokerError):
    status = 503
    code = "timeline_unavailable"
    title = "Audit timeline unavailable"
    retry_after: ClassVar[int | None] = 5


def read_events(
    chains: list[timeline.Chain],
    vault_log: Path | None,
    index: Path,
    key: bytes,
    filters: merge.Filters,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    """Blocking: one answer of GET /v1/audit/events (see :mod:`broker.audit.timeline`)."""
    try:
        return _read_events(chains, vault_log, index, key, filters, limit, cursor)
    except (sqlite3.Error, OSError) as exc:
        # The disk under the audit directory is full or read-only, a file unreadable: say so, 503.
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TimelineUnavailable(f"the audit timeline cannot be read now: {reason}") from None


def _read_events(
    chains: list[timeline.Chain],
    vault_log: Path | None,
    index: Path,
    key: bytes,
    filters: merge.Filters,
    limit: int,
    cursor: str | None,
) -> dict[str, Any]:
    with timeline.Timeline(chains, vault_log, index) as view:
        if cursor is None:
            page = timeline.newest(view, filters, limit)
        else:
            try:
                after = (
                    timeline.start_cursor(len(chains))
                    if cursor == CURSOR_START
                    else timeline.decode_cursor(cursor, key, len(chains))
                )
                view.check(after)
            except timeline.CursorError as exc:
                raise _bad_cursor(str(exc)) from None
            page = timeline.page_after(view, after, filters, limit)
    return {
        "events": page.rows,
        "count": len(page.rows),
        "matched": page.matched,
        "truncated": page.more,
        "next": timeline.encode_cursor(page.next, key) if page.next is not None else None,
        "vault_log": vault_log is not None,
    }


async def events(request: web.Request) -> web.Response:
    """GET /v1/audit/events: the merged timeline, filtered; pages with ``cursor``, else the newest rows."""
    await authorize(request, "audit.read")
    filters = _filters(request.query)
    raw_limit = request.query.get("limit", "1000")
    # ASCII digits only: int() would also take " 10", "1_0" and non-ASCII digits (U+0661...).
    if not (raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 6):
        raise BadRequest("'limit' must be an integer")
    limit = int(raw_limit)
    if not 1 <= limit <= MAX_EVENTS:
        raise BadRequest(f"'limit' must be between 1 and {MAX_EVENTS}")
    cursor = request.query.get("cursor")
    if cursor is not None and cursor != CURSOR_START and len(cursor) > timeline.MAX_CURSOR_CHARS:
        raise _bad_cursor("too long")
    sink = request.app[AUDIT]
    vault_log = request.app[SETTINGS].audit.vault_audit_log
    chains = timeline_chains(sink.directory, sink.node, request.app.get(WORKER))
    key = timeline.cursor_key(request.app[AUDIT_HMAC_KEY], sink.node)
    index = sink.directory / timeline.INDEX_NAME
    body = await asyncio.get_running_loop().run_in_executor(
        None, lambda: read_events(chains, vault_log, index, key, filters, limit, cursor)
    )
    return web.json_response(body)


async def hmac_of(request: web.Request) -> web.Response:
    """POST /v1/audit/hmac: the HMAC a context value has in records, to search for it."""
    await authorize(request, "audit.read")
    body = await schemas.json_object(request)
    value = schemas.string(body, "value", required=True)
    return web.json_response({"hmac": hmac_value(request.app[AUDIT_HMAC_KEY], value)})


def add_audit_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/audit/verify", verify)
    r.add_get("/v1/audit/events", events)
    r.add_get("/v1/audit/public-key", public_key)
    r.add_post("/v1/audit/hmac", hmac_of)
    r.add_post("/v1/audit/epoch", new_epoch)
