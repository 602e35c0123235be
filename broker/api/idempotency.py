"""``Idempotency-Key``: a management request retried (after a timeout, through any replica) is done once.

The outcome of the first request is kept in Vault KV (shared by every replica), under a
SHA-256 of the caller's principal, the operation, the key name and the header's value, so
neither the caller's text nor its length ever reaches a Vault path. A record is claimed
with check-and-set before the work starts:

- no record (or an expired one, or one whose request failed): this request does the work;
- the same request finished: its answer is replayed (``Idempotent-Replayed: true``, and
  the audit record says so, naming the original request);
- the same request still running: 409 ``idempotency_in_progress`` (retry later);
- a different body under the same key: 422 ``idempotency_key_reused``.

Only successful answers are kept: a request that failed (a 4xx, a backend 5xx) leaves
nothing behind, so its retry is decided afresh. Records are honoured for
``keys.idempotency_ttl_seconds`` (24 h by default); every replica's sweep
(:func:`sweep_loop`) then erases them, a bounded page per pass. KV v2 cannot delete
check-and-set, so a record is first replaced check-and-set by a short-lived tombstone (a
claim of the same key meanwhile gets 409 and retries), and only then deleted.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from aiohttp import web

from broker import periodic
from broker.api.problem import PROBLEM_CONTENT_TYPE, problem_body
from broker.api.state import AUDIT_FACTS, PRINCIPAL, REQUEST_ID
from broker.audit.events import RequestFacts
from broker.backends.vault import VaultClient
from broker.errors import BadRequest, BrokerError, ClientError, Conflict, OutcomeUnknown
from broker.log import get_logger
from broker.state.kv import CasConflict, KvDocuments
from broker.timeutil import iso, now_utc, parse_iso

log = get_logger(__name__)

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# Visible ASCII only: no space, control character or anything a log or proxy could reinterpret.
_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
# How long a request holds its record while it runs; a replica that died mid-request frees it
# after this. Far longer than any management operation may take (backend timeouts are seconds).
LEASE_SECONDS = 300.0
# The headers of an answer that are replayed with it.
_KEPT_HEADERS = ("Location",)
# Records a sweep pass reads at most (one paginated LIST, then one read each): bounded work per
# pass on each replica, still far more than a broker writes between two passes.
SWEEP_PAGE = 500
# How long a sweep's tombstone holds a record off (409) before it lapses, judged on each
# replica's own clock; the sweep deletes only within DELETE_WINDOW_SECONDS of writing it (on its
# clock), else leaves the record to a later pass. The gap between the two is the clock skew
# between replicas that can never let a claim land on a tombstone about to be deleted (the
# scheduler assumes at most 60 s).
TOMBSTONE_SECONDS = 600.0
DELETE_WINDOW_SECONDS = 30.0
# A record's name as record_id makes it; anything else under the prefix is not the sweep's to erase.
_RECORD_NAME = re.compile(r"[0-9a-f]{64}")


class InvalidIdempotencyKey(BadRequest):
    code = "invalid_idempotency_key"
    title = "Invalid Idempotency-Key"


class IdempotencyKeyReused(ClientError):
    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency-Key used for another request"


class IdempotencyInProgress(Conflict):
    code = "idempotency_in_progress"
    title = "A request with this Idempotency-Key is still running"
    retry_after: ClassVar[int | None] = 1


# Marks a handler that changes state but keeps no Idempotency-Key record.
_UNKEPT = "_keybroker_unkept_idempotency"
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def keeps_no_records(handler: _Handler) -> _Handler:
    """Mark a changing handler whose retries the broker cannot recognise: a request to it that
    carries an Idempotency-Key is refused before it runs (:func:`refuse_unkept_key`)."""
    setattr(handler, _UNKEPT, True)
    return handler


def refuse_unkept_key(request: web.Request) -> None:
    """Refuse an Idempotency-Key where no record is kept: silently ignoring it would let a
    client believe its retry cannot repeat the change."""
    if HEADER in request.headers and getattr(request.match_info.handler, _UNKEPT, False):
        raise InvalidIdempotencyKey(
            f"this operation keeps no {HEADER} record, so a retry would change things again; send none"
        )


def offered_key(request: web.Request) -> str | None:
    """The request's Idempotency-Key, checked as hostile input (never echoed); None if absent."""
    values = request.headers.getall(HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise InvalidIdempotencyKey(f"send one {HEADER} header, not {len(values)}")
    value = values[0]
    if _KEY_RE.fullmatch(value) is None:
        raise InvalidIdempotencyKey(
            f"{HEADER} must be 1-{MAX_KEY_LENGTH} visible ASCII characters (no spaces or controls)"
        )
    return value


def record_id(principal: str, operation: str, key_name: str, key: str) -> str:
    """The record's name: a hash, so only hex ever reaches the Vault path."""
    scope = "\0".join((principal, operation, key_name, key))
    return hashlib.sha256(scope.encode()).hexdigest()


def fingerprint(body: dict[str, Any]) -> str:
    """What makes two requests "the same": their JSON bodies, member order and spacing aside."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Replay:
    """A finished request's answer, to be given again."""

    status: int
    body: Any
    headers: dict[str, str]
    request_id: str


class IdempotencyStore:
    """Records under ``<kv mount>/data/idempotency/<sha256>``, every write check-and-set."""

    def __init__(
        self,
        vault: VaultClient,
        kv_mount: str,
        *,
        ttl_seconds: float,
        lease_seconds: float = LEASE_SECONDS,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self._docs = KvDocuments(vault, kv_mount, "idempotency")
        self._ttl = timedelta(seconds=ttl_seconds)
        self._lease = timedelta(seconds=lease_seconds)
        self._clock = clock

    def _void(self, record: dict[str, Any] | None, now: datetime) -> bool:
        """Whether a record no longer counts: absent, expired, a request that failed or died, or
        not a record this broker wrote (a malformed entry is replaced, never trusted)."""
        if record is None:
            return True
        try:
            if now >= parse_iso(record["expires_at"]) or not isinstance(record["fingerprint"], str):
                return True
            if not isinstance(record["request_id"], str):
                return True
            if record["state"] == "pending":
                return now >= parse_iso(record["lease_until"])
            answer = record["answer"]
            return not (
                record["state"] == "done"
                and isinstance(answer["status"], int)
                and isinstance(answer["headers"], dict)
                and all(isinstance(v, str) for v in answer["headers"].values())
                and "body" in answer
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return True

    async def begin(self, rid: str, fp: str, owner: str) -> Replay | None:
        """Claim the record for request ``owner``; or the answer to replay; or raise."""
        now = self._clock()
        replay: list[Replay] = []

        def claim(current: dict[str, Any] | None) -> dict[str, Any]:
            replay.clear()
            if current is not None and self._tombstone_live(current, now):
                raise IdempotencyInProgress(
                    f"the expired record of this {HEADER} is being erased; retry in a few seconds"
                )
            if current is not None and not self._void(current, now):
                if current["fingerprint"] != fp:
                    raise IdempotencyKeyReused(
                        f"this {HEADER} was used for a request with another body; use a new key"
                    )
                if current["state"] == "pending":
                    # Also a request whose outcome could not be recorded (Vault refused the
                    # write): its change may be made, so the record holds until the lease ends.
                    frees = iso(parse_iso(current["lease_until"]))
                    raise IdempotencyInProgress(
                        f"the first request with this {HEADER} is still running or its outcome was "
                        f"not recorded; retry in a few seconds (its hold ends by {frees} at the latest)"
                    )
                answer = current["answer"]
                replay.append(
                    Replay(
                        int(answer["status"]),
                        answer["body"],
                        dict(answer["headers"]),
                        str(current["request_id"]),
                    )
                )
                return current
            return {
                "state": "pending",
                "fingerprint": fp,
                "request_id": owner,
                "created_at": iso(now),
                "lease_until": iso(now + self._lease),
                "expires_at": iso(now + self._ttl),
            }

        await self._docs.update(rid, claim)
        return replay[0] if replay else None

    async def finish(self, rid: str, owner: str, status: int, body: Any, headers: dict[str, str]) -> None:
        """Keep the answer of request ``owner`` (if the record is still its own)."""

        def done(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None or current.get("request_id") != owner or current.get("state") != "pending":
                raise _NotOurs
            return {
                **current,
                "state": "done",
                "answer": {"status": status, "body": body, "headers": headers},
            }

        try:
            await self._docs.update(rid, done)
        except _NotOurs:
            log.warning("idempotency_record_taken_over", record=rid[:16])

    async def abandon(self, rid: str, owner: str) -> None:
        """Free the record of a request that failed, so a retry is decided afresh (best effort:
        a record that cannot be freed lapses after the lease)."""
        now = self._clock()

        def release(current: dict[str, Any] | None) -> dict[str, Any]:
            if current is None or current.get("request_id") != owner or current.get("state") != "pending":
                raise _NotOurs
            return {**current, "lease_until": iso(now)}

        try:
            await self._docs.update(rid, release)
        except _NotOurs:
            pass
        except BrokerError as exc:
            log.warning("idempotency_record_not_freed", record=rid[:16], error=exc.detail)

    @staticmethod
    def _tombstone_live(record: dict[str, Any], now: datetime) -> bool:
        """A sweep's tombstone still holding the record off (a lapsed one is void like any)."""
        if record.get("state") != "swept":
            return False
        try:
            return now < parse_iso(record["swept_until"])
        except (KeyError, TypeError, ValueError):
            return False

    @staticmethod
    def _expired(record: dict[str, Any], now: datetime) -> bool:
        """Whether the sweep may erase a record: past its expiry and, if still running, past its
        lease too. Unreadable dates keep the record (never erase what cannot be dated)."""
        try:
            if now < parse_iso(record["expires_at"]):
                return False
            if record.get("state") == "pending":
                return now >= parse_iso(record["lease_until"])
            if record.get("state") == "swept":
                return now >= parse_iso(record["swept_until"])
        except (KeyError, TypeError, ValueError):
            return False
        return True

    async def sweep(self, after: str = "", limit: int = SWEEP_PAGE) -> tuple[dict[str, int], str]:
        """One bounded pass: erase the expired records among the next ``limit`` names after
        ``after``; return counts (never the records) and where the next pass starts ("" to wrap)."""
        names = await self._docs.names_page(after, limit)
        counts = {"examined": 0, "erased": 0, "kept": 0, "contended": 0}
        for name in names:
            if _RECORD_NAME.fullmatch(name) is None:
                continue
            counts["examined"] += 1
            counts[await self._sweep_one(name)] += 1
        return counts, (names[-1] if len(names) >= limit else "")

    async def _sweep_one(self, name: str) -> str:
        found = await self._docs.read(name)
        if found is None:
            return "kept"
        record, version = found
        now = self._clock()
        if not self._expired(record, now):
            return "kept"
        grace = timedelta(seconds=TOMBSTONE_SECONDS)
        tombstone = {"state": "swept", "swept_until": iso(now + grace), "expires_at": iso(now)}
        try:
            # Check-and-set on the version just judged: a request that claimed the record since
            # makes this fail, and from here until the delete a claim meets the tombstone (409).
            await self._docs.write(name, tombstone, version)
        except CasConflict:
            return "contended"
        if self._clock() - now >= timedelta(seconds=DELETE_WINDOW_SECONDS):
            # Too slow to be sure the tombstone still holds; it lapses and a later pass retries.
            return "contended"
        await self._docs.delete(name)
        return "erased"


async def sweep_loop(store: IdempotencyStore, interval: float) -> None:
    """Erase expired records every ``interval`` seconds, a page per pass, until cancelled.

    Replicas sweep independently (the tombstone's check-and-set makes one of them erase a record);
    no failure ends the loop, and only counts are logged.
    """
    after = ""

    async def sweep_a_page() -> None:
        nonlocal after
        counts, after = await store.sweep(after)
        if counts["erased"] or counts["contended"]:
            log.info("idempotency_records_swept", **counts)

    await periodic.every(interval, sweep_a_page, what="idempotency_sweep")


class _NotOurs(Exception):
    pass


def _json_body(response: web.Response) -> Any:
    """The JSON answer a handler built with ``web.json_response``."""
    body = response.body
    if not isinstance(body, bytes):
        raise TypeError("an idempotent handler must answer with web.json_response")
    return json.loads(body)


def _replayed(replay: Replay, facts: RequestFacts | None) -> web.Response:
    """The kept answer again. A kept error (504 outcome_unknown) goes out as the first one did:
    problem+json, and its record names the error (it never passed the error middleware)."""
    headers = {**replay.headers, REPLAYED_HEADER: "true"}
    if replay.status < 400:
        return web.json_response(replay.body, status=replay.status, headers=headers)
    problem = replay.body if isinstance(replay.body, dict) else {}
    code, detail = problem.get("code"), problem.get("detail")
    if facts is not None and isinstance(code, str) and isinstance(detail, str):
        facts.error = (code, detail)
    return web.Response(
        body=json.dumps(replay.body).encode(),
        status=replay.status,
        headers=headers,
        content_type=PROBLEM_CONTENT_TYPE,
    )


async def idempotent(
    request: web.Request,
    store: IdempotencyStore,
    operation: str,
    key_name: str,
    body: dict[str, Any],
    run: Callable[[], Awaitable[web.Response]],
) -> web.Response:
    """``run()`` once per Idempotency-Key (when the request carries one); else replay its answer.

    Call it after the request is authorized and its body checked, right before the change:
    a caller replays only what it may still do, and a refused request leaves no record.
    """
    key = offered_key(request)
    if key is None:
        return await run()
    rid = record_id(str(request[PRINCIPAL].id), operation, key_name, key)
    owner = request[REQUEST_ID]
    facts = request.get(AUDIT_FACTS)
    replay = await store.begin(rid, fingerprint(body), owner)
    if replay is not None:
        if facts is not None:
            facts.idempotency = {
                "record": rid[:32],
                "replayed": True,
                "original_request_id": replay.request_id,
            }
        return _replayed(replay, facts)
    try:
        response = await run()
    except OutcomeUnknown as exc:
        # The change was sent and may yet be made: running it again under the same key could
        # make it twice. The unknown outcome is this key's answer; a caller who has read the key
        # and still wants the change sends it under a new Idempotency-Key.
        kept = json.loads(problem_body(exc, request[REQUEST_ID]))
        try:
            await store.finish(rid, owner, exc.status, kept, {})
        except BrokerError as unkept:
            log.warning("idempotency_answer_not_kept", record=rid[:16], error=unkept.detail)
        raise
    except BaseException:
        await store.abandon(rid, owner)
        raise
    if facts is not None:
        facts.idempotency = {"record": rid[:32], "replayed": False}
    headers = {h: response.headers[h] for h in _KEPT_HEADERS if h in response.headers}
    try:
        await store.finish(rid, owner, response.status, _json_body(response), headers)
    except BrokerError as exc:
        # The change is made: the answer goes out. A retry within the lease gets 409, after
        # it the change would be made again; say so in the log.
        log.warning("idempotency_answer_not_kept", record=rid[:16], error=exc.detail)
    return response
