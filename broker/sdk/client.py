"""``Client``: the blocking keybroker client. Every method is one broker operation (see ``_calls``)."""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from broker.sdk import _calls as ops
from broker.sdk._calls import BatchItem, Call, Response
from broker.sdk._settings import RetryPolicy, resolve
from broker.sdk._sync import SyncTransport
from broker.sdk.errors import KeybrokerError, UnexpectedResponse
from broker.sdk.types import DataKey, Sealed, Signature

T = TypeVar("T")


def check(call: Call[T], resp: Response) -> T:
    """The call's result from its answer, or the error the answer stands for."""
    if resp.status >= 300 and resp.status not in call.ok:
        raise resp.problem(call.path)
    return call.parse(resp)


def next_cursor(page: dict[str, Any], cursor: str) -> str | None:
    """The cursor of the page after ``page``, None after the last; refuses a broker that loops."""
    if "next" not in page or not isinstance(page.get("events"), list):
        raise UnexpectedResponse(0, "bad_answer", "the broker does not page audit events (an older version)")
    following = page["next"]
    if not following:
        return None
    if not isinstance(following, str) or following == cursor:
        raise UnexpectedResponse(0, "bad_answer", "the broker answered the same audit page twice")
    return following


class Client:
    """A keybroker client over mutual TLS, safe to share between threads.

    ``addresses``: one URL or several (a list, or one comma-separated string); default
    ``$KEYBROKER_ADDR``. TLS: an ``ssl_context``, or the CA, certificate and key files, each
    defaulting to ``$KEYBROKER_CACERT``, ``$KEYBROKER_CLIENT_CERT``, ``$KEYBROKER_CLIENT_KEY``.

    Connections are kept alive per address. Reads and crypto operations are retried on 503/429
    and on a lost connection, on the next address first, with jittered backoff honouring
    ``Retry-After``; other changes only when nothing reached the broker, or when they carry an
    ``Idempotency-Key`` (``create_key`` and ``rotate_key`` always send one) and
    ``idempotent_retries`` is on: that needs a broker that honours the header.
    """

    def __init__(
        self,
        addresses: str | Sequence[str] | None = None,
        *,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_retry_after: float = 30.0,
        idempotent_retries: bool = True,
    ) -> None:
        urls, context = resolve(addresses, ssl_context, ca_cert, client_cert, client_key)
        policy = RetryPolicy(retries, backoff, max_backoff, max_retry_after)
        self._transport = SyncTransport(urls, context, timeout, policy, idempotent_retries)

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def addresses(self) -> tuple[str, ...]:
        return self._transport.router.addresses

    @property
    def address(self) -> str:
        """The address tried first: the last one that answered."""
        return self._transport.router.current

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _run(self, call: Call[T]) -> T:
        return check(call, self._transport.send(call))

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        ok: tuple[int, ...] = (),
        safe: bool | None = None,
        idempotency_key: str | None = None,
    ) -> Response:
        """One request with retries and fail-over; the answer whatever its status (the low level).
        A status in ``ok`` is an answer, never retried (``ok=(503,)`` for health)."""
        return self._transport.send(ops.raw(method, path, body, ok, safe, idempotency_key))

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        ok: tuple[int, ...] = (),
        safe: bool | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """One JSON request; its JSON answer, or the :class:`KeybrokerError` of an error status
        not in ``ok``. Retried as a read when ``safe`` (default: GET, and crypto POSTs by path)."""
        return self._run(ops.raw(method, path, body, ok, safe, idempotency_key))

    # -- crypto -----------------------------------------------------------------------------

    def encrypt(self, key: str, plaintext: bytes, context: Mapping[str, str] | None = None) -> Sealed:
        return self._run(ops.encrypt(key, plaintext, context))

    def decrypt(self, key: str, ciphertext: str, context: Mapping[str, str] | None = None) -> bytes:
        return self._run(ops.decrypt(key, ciphertext, context))

    def encrypt_batch(
        self, key: str, items: Iterable[BatchItem], context: Mapping[str, str] | None = None
    ) -> list[Sealed | KeybrokerError]:
        """Many plaintexts in one request; each result a Sealed or that item's error, in order."""
        return self._run(ops.encrypt_batch(key, items, context))

    def decrypt_batch(
        self,
        key: str,
        items: Iterable[str | tuple[str, Mapping[str, str] | None]],
        context: Mapping[str, str] | None = None,
    ) -> list[bytes | KeybrokerError]:
        return self._run(ops.decrypt_batch(key, items, context))

    def generate_data_key(
        self, key: str, context: Mapping[str, str] | None = None, *, size: int = 32
    ) -> DataKey:
        return self._run(ops.generate_data_key(key, context, size))

    def generate_data_key_without_plaintext(
        self, key: str, context: Mapping[str, str] | None = None, *, size: int = 32
    ) -> Sealed:
        """A data key only in its wrapped form (for a service that encrypts later, elsewhere)."""
        return self._run(ops.generate_data_key_sealed(key, context, size))

    def rewrap(
        self,
        key: str,
        ciphertext: str,
        context: Mapping[str, str] | None = None,
        *,
        to_key: str | None = None,
    ) -> Sealed:
        return self._run(ops.rewrap(key, ciphertext, context, to_key))

    def sign(self, key: str, message: bytes | None = None, *, digest: bytes | None = None) -> Signature:
        return self._run(ops.sign(key, message, digest))

    def verify(
        self, key: str, signature: str, message: bytes | None = None, *, digest: bytes | None = None
    ) -> bool:
        return self._run(ops.verify(key, signature, message, digest))

    # -- keys -------------------------------------------------------------------------------

    def create_key(
        self,
        name: str,
        *,
        backend: str,
        environment: str,
        key_type: str | None = None,
        rotation_period: int | str | None = None,
        deletion_protection: bool | None = None,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return self._run(
            ops.create_key(
                name,
                backend,
                environment,
                key_type=key_type,
                rotation_period=rotation_period,
                deletion_protection=deletion_protection,
                tags=tags,
                description=description,
                idempotency_key=idempotency_key or ops.new_idempotency_key(),
            )
        )

    def list_keys(
        self,
        *,
        backend: str | None = None,
        state: str | None = None,
        environment: str | None = None,
        tag: str | None = None,
        page_size: int = 500,
    ) -> list[dict[str, Any]]:
        """Every key the caller may see (filtered), asked for ``page_size`` at a time so neither
        the broker nor Vault reads a large registry in one request."""
        filters = {"backend": backend, "state": state, "environment": environment, "tag": tag}
        listing = ops.KeyListing()
        after: str | None = None
        while True:
            page, after = self._run(ops.list_keys(filters, page_size, after))
            if not listing.add(page, after):
                return listing.keys

    def get_key(self, name: str) -> dict[str, Any]:
        return self._run(ops.get_key(name))

    def update_key(self, name: str, **changes: Any) -> dict[str, Any]:
        """rotation_period (None clears), description, tags, deletion_protection, min_decrypt_version."""
        return self._run(ops.update_key(name, changes))

    def rotate_key(self, name: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        return self._run(ops.lifecycle(name, "rotate", {}, idempotency_key or ops.new_idempotency_key()))

    def suspend_key(self, name: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        return self._run(ops.lifecycle(name, "suspend", {}, idempotency_key))

    def resume_key(self, name: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        return self._run(ops.lifecycle(name, "resume", {}, idempotency_key))

    def revoke_key(self, name: str, reason: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        """reason: ``retired`` (decrypt/verify only from now on) or ``compromised``."""
        return self._run(ops.lifecycle(name, "revoke", {"reason": reason}, idempotency_key))

    def schedule_destruction(
        self, name: str, pending_days: int | None = None, *, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        body = {} if pending_days is None else {"pending_days": pending_days}
        return self._run(ops.lifecycle(name, "schedule-destruction", body, idempotency_key))

    def cancel_destruction(self, name: str, *, idempotency_key: str | None = None) -> dict[str, Any]:
        return self._run(ops.lifecycle(name, "cancel-destruction", {}, idempotency_key))

    # -- grants -----------------------------------------------------------------------------

    def create_grant(
        self,
        key: str,
        grantee: str,
        operations: Iterable[str],
        expires_in: int | str,
        *,
        context_equals: Mapping[str, str] | None = None,
        context_subset: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return self._run(
            ops.create_grant(
                key, grantee, operations, expires_in, context_equals, context_subset, idempotency_key
            )
        )

    def list_grants(self, key: str) -> list[dict[str, Any]]:
        return self._run(ops.list_grants(key))

    def revoke_grant(self, key: str, grant_id: str) -> dict[str, Any]:
        return self._run(ops.revoke_grant(key, grant_id))

    def retire_grant(self, key: str, grant_id: str) -> dict[str, Any]:
        return self._run(ops.retire_grant(key, grant_id))

    # -- policies and bindings --------------------------------------------------------------

    def get_policies(self) -> dict[str, Any]:
        return self._run(ops.get_policies())

    def put_policies(
        self, document: Mapping[str, Any], *, version: int | None = None, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Replace the whole document; with ``version``, only if the stored one is still at it (409)."""
        return self._run(ops.put_policies(document, version, idempotency_key))

    def get_role(self, role: str) -> dict[str, Any]:
        return self._run(ops.get_role(role))

    def put_role(self, role: str, document: Mapping[str, Any]) -> dict[str, Any]:
        return self._run(ops.put_role(role, document))

    def delete_role(self, role: str) -> dict[str, Any]:
        return self._run(ops.delete_role(role))

    def explain(
        self,
        principal: str,
        operation: str,
        *,
        key: str | None = None,
        context: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        return self._run(ops.explain(principal, operation, key, context))

    def get_bindings(self) -> dict[str, Any]:
        return self._run(ops.get_bindings())

    def put_bindings(
        self, bindings: Mapping[str, Iterable[str]], *, version: int | None = None
    ) -> dict[str, Any]:
        return self._run(ops.put_bindings(bindings, version))

    # -- health, metrics, audit -------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The health document (``status`` ``ok`` or ``unavailable``; a 503 is returned, not raised)."""
        return self._run(ops.health())

    def metrics(self) -> str:
        return self._run(ops.metrics())

    def audit_verify(self) -> dict[str, Any]:
        return self._run(ops.audit_verify())

    def audit_events(self, **params: str | int | None) -> dict[str, Any]:
        """One page of the merged timeline (since, until, principal, key, operation, outcome,
        source, cursor, limit: see the API)."""
        return self._run(ops.audit_events(params))

    def iter_audit_events(self, *, page_size: int = 1000, **filters: str | None) -> Iterator[dict[str, Any]]:
        """Every matching timeline row, oldest first, a page per request."""
        cursor: str | None = "start"
        while cursor is not None:
            page = self.audit_events(**filters, cursor=cursor, limit=page_size)
            yield from page["events"]
            cursor = next_cursor(page, cursor)

    def audit_public_key(self) -> str:
        return self._run(ops.audit_public_key())

    def audit_hmac(self, value: str) -> str:
        return self._run(ops.audit_hmac(value))

    def audit_epoch(self, name: str, reason: str) -> dict[str, Any]:
        return self._run(ops.audit_epoch(name, reason))
