"""``/v1/audit``: verify the chain, read the merged timeline, HMAC a value to look for,
start a new epoch after lost history.

Reading and verifying the log happens on the audit thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from broker.errors import BadRequest, Forbidden
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


def read_timeline(
    sink_files: Sequence[tuple[str, chain.Content]],
    vault_log: Path | None,
    siblings: Sequence[tuple[str, Path]] = (),
    own_node: str = "",
) -> list[dict[str, Any]]:
    """Blocking: the merged timeline of this broker's log (and its sibling workers' chains, each
    row then naming its ``chain``) and, if readable here, Vault's."""
    vault: list[dict[str, Any]] = []
    if vault_log is not None and vault_log.is_file():
        with vault_log.open("rb") as fh:
            vault = merge.vault_entries(fh)
    records = merge.broker_records(sink_files)
    if siblings:
        records = [{**r, "chain": own_node} for r in records]
        for node, directory in siblings:
            rows = merge.broker_records(segment_sources(_segment_paths(directory)))
            records += [{**r, "chain": node} for r in rows]
    return merge.merge(records, vault)


# Paging: a cursor is the sort key of the last row a page held, so the next page starts right
# after it however the log grew in between (rows are ordered by time, then by an id unique in
# the timeline). It is opaque to callers, and parsed as hostile input when it comes back.
CURSOR_START = "start"
MAX_CURSOR_CHARS = 512
RowKey = timeline.RowKey


_row_key = timeline.row_key


def _encode_cursor(key: RowKey) -> str:
    raw = json.dumps([key[0].isoformat(), key[1]], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_cursor(text: str) -> RowKey:
    bad = BadRequest(f"'cursor' must be '{CURSOR_START}' or the 'next' value of an earlier answer")
    if len(text) > MAX_CURSOR_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        moment, ident = json.loads(raw)
        if not isinstance(moment, str) or not isinstance(ident, str):
            raise bad
        return merge.parse_time(moment), ident
    except (ValueError, TypeError, binascii.Error):
        raise bad from None


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
    after = None if cursor in (None, CURSOR_START) else _decode_cursor(str(cursor))
    sink = request.app[AUDIT]
    vault_log = request.app[SETTINGS].audit.vault_audit_log
    loop = asyncio.get_running_loop()
    own = await loop.run_in_executor(sink.executor, _segment_paths, sink.directory)
    worker = request.app.get(WORKER)
    siblings = [(n, d) for _, n, d in _sibling_chains(sink.directory, sink.node, worker)] if worker else []

    def read() -> tuple[list[dict[str, Any]], int, bool]:
        chains = [timeline.Chain(own, sink.node if siblings else None)]
        chains += [timeline.Chain(_segment_paths(d), n) for n, d in siblings]
        if cursor is None:
            rows, matched = timeline.newest(chains, vault_log, filters, limit)
            return rows, matched, matched > len(rows)
        rows, more = timeline.page(chains, vault_log, filters, after, limit)
        # With a cursor the rest is not counted (that would read the whole log for every page):
        # 'matched' is this page's rows plus one when more follow.
        return rows, len(rows) + int(more), more

    page, matched, truncated = await loop.run_in_executor(None, read)
    next_cursor = _encode_cursor(_row_key(page[-1])) if cursor is not None and truncated else None
    return web.json_response(
        {
            "events": page,
            "count": len(page),
            "matched": matched,
            "truncated": truncated,
            "next": next_cursor,
            "vault_log": vault_log is not None,
        }
    )


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
