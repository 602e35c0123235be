"""Vault over its HTTP API: one pooled aiohttp session, AppRole login, token renewal.

hvac is synchronous and used only for bootstrap and admin commands
(``broker.vaultops``); the broker's own calls go through :class:`VaultClient`.
Every call carries the broker-generated request id as ``X-Request-Id`` (a
``kb-bg-`` one outside a request), which Vault's file audit device records, so
broker and Vault audit entries join on it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from broker.backends._coalesce import Coalescer
from broker.backends.base import Backend, Context, KeyRef, KeyType, canonical_context
from broker.config.model import VaultConfig
from broker.context import note_backend_call, outgoing_request_id
from broker.errors import (
    BackendTimeout,
    BadGateway,
    BadRequest,
    BrokerError,
    ConfigError,
    DecryptionFailed,
    NotFound,
    Unavailable,
    UnsupportedOperation,
)
from broker.log import get_logger

log = get_logger(__name__)
BACKEND = "vault"
# How long to wait before retrying a failed login, growing to the cap.
_LOGIN_RETRY = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


# A fixed part of a Vault path (a mount, an endpoint word): configuration or code, never a caller.
_FIXED_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def vault_path(base: str, *segments: str) -> str:
    """The one way to build a Vault API path: ``v1/<base>/<segment>/...``.

    ``base`` is a fixed "/"-separated path (mount and endpoint, e.g. ``kv/data/keys``).
    Each of ``segments`` is ONE path segment that may come from a caller (a key name):
    it is percent-encoded whole, so ``?``, ``#`` and ``%`` cannot add a query or a
    fragment. Some things no encoding makes safe, so they are refused outright: dot
    segments (the HTTP client and Vault normalise ``..``, even as ``%2E%2E``), ``/`` and
    ``\\`` (Vault routes on the decoded path, where ``%2F`` is a separator again),
    control characters and lone surrogates. Names are validated against their own rule
    earlier; this is the last line, not the first.
    """
    fixed = base.strip("/").split("/")
    if not all(_FIXED_SEGMENT.fullmatch(part) for part in fixed):
        raise ValueError(f"not a fixed Vault path: {base!r}")
    encoded = []
    for segment in segments:
        if segment in ("", ".", "..") or "/" in segment or "\\" in segment or not segment.isprintable():
            raise BadRequest("a name is not usable as a Vault path segment")
        try:
            segment.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("a name is not usable as a Vault path segment") from None
        encoded.append(urllib.parse.quote(segment, safe=""))
    return "/".join(("v1", *fixed, *encoded))


class VaultHTTPError(Exception):
    """Vault answered with an error status; translated at the boundary."""

    def __init__(self, status: int, errors: list[str]) -> None:
        super().__init__(f"HTTP {status}: {'; '.join(errors) or 'no detail'}")
        self.status = status
        self.errors = errors


@contextlib.contextmanager
def map_vault_errors(what: str) -> Iterator[None]:
    """Translate transport and HTTP failures talking to Vault into broker errors."""
    try:
        yield
    except VaultHTTPError as exc:
        if exc.status == 404:
            raise NotFound(f"vault: {what}: not found") from exc
        if exc.status in (429, 503):
            raise Unavailable(f"vault: {what}: {exc}", backend=BACKEND) from exc
        raise BadGateway(f"vault: {what}: {exc}", backend=BACKEND) from exc
    except TimeoutError as exc:
        raise BackendTimeout(f"vault: {what}: timed out", backend=BACKEND) from exc
    except aiohttp.ClientConnectionError as exc:
        raise Unavailable(
            f"vault: {what}: cannot connect ({exc.__class__.__name__})", backend=BACKEND
        ) from exc
    except aiohttp.ClientError as exc:
        raise BadGateway(f"vault: {what}: {exc.__class__.__name__}", backend=BACKEND) from exc
    except ValueError as exc:  # a body that is not JSON
        raise BadGateway(f"vault: {what}: unreadable response", backend=BACKEND) from exc


@dataclass
class _Token:
    value: str
    accessor: str
    ttl: float
    renewable: bool
    obtained_at: float


def read_secret_file(path: Path, key: str) -> str:
    """Read a one-line secret from a file named in config; the value is never logged."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path}", key=key) from None
    except PermissionError:
        raise ConfigError(f"permission denied reading {path}", key=key) from None
    if not value:
        raise ConfigError(f"file is empty: {path}", key=key)
    return value


class VaultClient:
    """Authenticated access to Vault for the broker's hot path and health checks."""

    def __init__(self, config: VaultConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._token: _Token | None = None
        self._login_lock = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = None
        self.logins = 0
        self.renewals = 0

    async def start(self) -> None:
        ssl_ctx: ssl.SSLContext | bool = True
        if self._config.ca_file is not None:
            ssl_ctx = ssl.create_default_context(cafile=str(self._config.ca_file))
        connector = aiohttp.TCPConnector(limit=128, ssl=ssl_ctx, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            base_url=self._config.address.rstrip("/") + "/",
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._config.timeout_seconds),
        )
        # Credentials are checked now so a missing file stops start-up with a clear error.
        self._credentials()
        try:
            await self.login()
        except (Unavailable, BadGateway, BackendTimeout) as exc:
            log.warning("vault_login_failed_at_start", error=str(exc))
        self._renewer = asyncio.create_task(self._renew_loop(), name="vault-token-renewer")

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        if self._session is not None:
            await self._session.close()

    def _credentials(self) -> tuple[str, str]:
        return (
            read_secret_file(self._config.role_id_file, "vault.role_id_file"),
            read_secret_file(self._config.secret_id_file, "vault.secret_id_file"),
        )

    @property
    def token_age(self) -> float | None:
        return None if self._token is None else self._clock() - self._token.obtained_at

    async def login(self) -> None:
        """Log in with AppRole and replace the current token; revoke the old one."""
        async with self._login_lock:
            role_id, secret_id = self._credentials()
            body = await self._raw(
                "POST",
                vault_path(f"auth/{self._config.approle_mount}", "login"),
                {"role_id": role_id, "secret_id": secret_id},
                token=None,
                what="approle login",
            )
            old = self._token
            self._token = self._token_from(body)
            self.logins += 1
            log.info("vault_login", ttl=self._token.ttl, renewable=self._token.renewable)
        if old is not None:
            with contextlib.suppress(Exception):
                await self._raw(
                    "POST",
                    "v1/auth/token/revoke-self",
                    None,
                    token=old.value,
                    what="revoke old token",
                )

    def _token_from(self, body: dict[str, Any]) -> _Token:
        auth = body.get("auth") or {}
        if not auth.get("client_token"):
            raise BadGateway("vault: login answered without a token", backend=BACKEND)
        return _Token(
            value=str(auth["client_token"]),
            accessor=str(auth.get("accessor", "")),
            ttl=float(auth.get("lease_duration") or 0),
            renewable=bool(auth.get("renewable")),
            obtained_at=self._clock(),
        )

    async def renew(self) -> None:
        """Renew the token; log in afresh when it cannot be renewed or nears its max TTL."""
        token = self._token
        if token is None or not token.renewable or token.ttl <= 0:
            await self.login()
            return
        try:
            body = await self._raw(
                "POST", "v1/auth/token/renew-self", {}, token=token.value, what="token renew"
            )
        except (Unavailable, BadGateway, BackendTimeout, NotFound) as exc:
            log.info("vault_renew_failed_relogin", error=str(exc))
            await self.login()
            return
        renewed = self._token_from(body)
        self.renewals += 1
        if renewed.ttl < token.ttl * self._config.renew_fraction:
            # Max TTL is close: renewals only shrink from here, so start a fresh token.
            log.info("vault_token_near_max_ttl_relogin", remaining=renewed.ttl)
            await self.login()
            return
        self._token = renewed
        log.info("vault_token_renewed", ttl=renewed.ttl)

    async def _renew_loop(self) -> None:
        attempt = 0
        while True:
            token = self._token
            if token is None:
                await asyncio.sleep(_LOGIN_RETRY[min(attempt, len(_LOGIN_RETRY) - 1)])
            else:
                due = token.obtained_at + token.ttl * self._config.renew_fraction
                await asyncio.sleep(max(due - self._clock(), 0.05))
            try:
                await (self.login() if self._token is None else self.renew())
                attempt = 0
            except (Unavailable, BadGateway, BackendTimeout, NotFound, ConfigError) as exc:
                log.warning("vault_token_refresh_failed", error=str(exc), attempt=attempt)
                await asyncio.sleep(_LOGIN_RETRY[min(attempt, len(_LOGIN_RETRY) - 1)])
                attempt += 1

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, what: str
    ) -> dict[str, Any]:
        """An authenticated call; a 403 (expired or revoked token) triggers one re-login and retry."""
        token = self._token or await self._login_and_get()
        try:
            return await self._raw(method, path, body, token=token.value, what=what)
        except BadGateway as exc:
            cause = exc.__cause__
            if not (isinstance(cause, VaultHTTPError) and cause.status == 403):
                raise
        token = await self._login_and_get()
        return await self._raw(method, path, body, token=token.value, what=what)

    async def _login_and_get(self) -> _Token:
        await self.login()
        if self._token is None:
            raise Unavailable("vault: login produced no token", backend=BACKEND)
        return self._token

    async def unauthenticated(
        self, path: str, *, what: str, ok_statuses: tuple[int, ...] = ()
    ) -> dict[str, Any]:
        return await self._raw("GET", path, None, token=None, what=what, ok_statuses=ok_statuses)

    async def _raw(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        token: str | None,
        what: str,
        ok_statuses: tuple[int, ...] = (),
    ) -> dict[str, Any]:
        if self._session is None:
            raise Unavailable("vault client is not started", backend=BACKEND)
        headers = {}
        if token is not None:
            headers["X-Vault-Token"] = token
        headers["X-Request-Id"] = outgoing_request_id()
        with map_vault_errors(what):
            async with self._session.request(method, path, json=body, headers=headers) as resp:
                if resp.status == 204:
                    return {}
                data = await resp.json(content_type=None) if resp.content_length != 0 else {}
                if resp.status >= 400 and resp.status not in ok_statuses:
                    errors = data.get("errors", []) if isinstance(data, dict) else []
                    raise VaultHTTPError(resp.status, [str(e) for e in errors])
                if not isinstance(data, dict):
                    return {}
                if data.get("request_id"):
                    note_backend_call(BACKEND, what, str(data["request_id"]))
                return data

    async def health(self) -> dict[str, Any]:
        """Seal state, HA leadership and whether the broker's token works."""
        seal = await self.unauthenticated("v1/sys/seal-status", what="seal status")
        report: dict[str, Any] = {
            "initialized": bool(seal.get("initialized")),
            "sealed": bool(seal.get("sealed", True)),
            "seal_type": seal.get("type", ""),
            "version": seal.get("version", ""),
        }
        if report["initialized"] and not report["sealed"]:
            leader = await self.unauthenticated("v1/sys/leader", what="leader status", ok_statuses=(503,))
            report["ha_enabled"] = bool(leader.get("ha_enabled"))
            report["is_leader"] = bool(leader.get("is_self"))
            report["leader_address"] = leader.get("leader_address", "")
            await self.request("GET", "v1/auth/token/lookup-self", what="token lookup")
            report["auth"] = "ok"
        report["ok"] = report["initialized"] and not report["sealed"] and report.get("auth") == "ok"
        return report


def vault_status(exc: BaseException) -> int | None:
    """The HTTP status behind a translated Vault error, if there was one."""
    cause = exc.__cause__
    return cause.status if isinstance(cause, VaultHTTPError) else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _transit_ciphertext(ref: str, payload: bytes) -> str:
    return f"vault:v{ref}:{_b64(payload)}"


def _transit_payload(ciphertext: str) -> bytes:
    # "vault:v<N>:<base64>": the version lives in the broker's ciphertext, so only the bytes are kept.
    prefix, _, encoded = ciphertext.rpartition(":")
    if not prefix.startswith("vault:v"):
        raise BadGateway("vault: transit answered an unexpected ciphertext format", backend=BACKEND)
    return base64.b64decode(encoded)


_TRANSIT_TYPES = {KeyType.AES256_GCM: "aes256-gcm96", KeyType.ECDSA_P256: "ecdsa-p256"}
_DATAKEY_BITS = {16: 128, 32: 256, 64: 512}
_ROTATE_ATTEMPTS = 100


def _batch_results(out: dict[str, Any], expected: int) -> list[dict[str, Any]]:
    results = (out.get("data") or {}).get("batch_results")
    if not isinstance(results, list) or len(results) != expected:
        raise BadGateway("vault: transit answered a batch with the wrong number of results", backend=BACKEND)
    return [r if isinstance(r, dict) else {} for r in results]


def _only(results: list[bytes | BrokerError]) -> bytes:
    result = results[0]
    if isinstance(result, BrokerError):
        raise result
    return result


class VaultTransit:
    """Keys in Vault's transit engine. A material reference is the transit version number.

    Versions are native: a rotation is a transit rotation. The context is sent as
    ``associated_data`` (AES-GCM AAD); the broker always names the version so its
    registry, not transit's "latest", decides which version encrypts.
    """

    name = Backend.VAULT
    key_types = frozenset(_TRANSIT_TYPES)

    def __init__(self, client: VaultClient, mount: str, *, coalesce: bool = True) -> None:
        self._client = client
        self._mount = mount
        self._rotation_locks: dict[str, asyncio.Lock] = {}
        self._encrypts: Coalescer[tuple[KeyRef, str], tuple[bytes, Context], bytes] = Coalescer(
            lambda target, items: self.encrypt_batch(target[0], target[1], items)
        )
        self._decrypts: Coalescer[KeyRef, tuple[str, bytes, Context], bytes] = Coalescer(self.decrypt_batch)
        self._coalesce = coalesce

    def _path(self, endpoint: str, name: str, *more: str) -> str:
        """``<mount>/<endpoint>/<key name>[/more]``, the name encoded as one segment."""
        return vault_path(f"{self._mount}/{endpoint}", name, *more)

    async def create_version(self, key: KeyRef) -> str:
        path = self._path("keys", key.name)
        try:
            info = await self._client.request("GET", path, what="transit read key")
        except NotFound:
            info = None
        if info is None:
            body = {"type": _TRANSIT_TYPES[key.type], "exportable": False, "allow_plaintext_backup": False}
            await self._client.request("POST", path, body, what="transit create key")
            # Creation answers 204 on some versions; the read is the authority on the first version.
            info = await self._client.request("GET", path, what="transit read key")
            return str(info["data"]["latest_version"])
        # One rotation of a key at a time from this replica; other replicas are handled below.
        lock = self._rotation_locks.setdefault(key.name, asyncio.Lock())
        async with lock:
            data = await self._rotate(self._path("keys", key.name, "rotate"))
        return str(data["latest_version"])

    async def _rotate(self, path: str) -> dict[str, Any]:
        # OpenBao commits storage transactions optimistically: two rotations of one key at
        # the same moment (from two replicas) make one fail with "transaction commit
        # failed" and nothing written, so retrying it is safe.
        for attempt in range(_ROTATE_ATTEMPTS):
            try:
                rotated = await self._client.request("POST", path, {}, what="transit rotate")
            except BadGateway as exc:
                if vault_status(exc) == 500 and "transaction commit failed" in str(exc.__cause__):
                    await asyncio.sleep(random.uniform(0, min(0.005 * (attempt + 1), 0.1)))  # noqa: S311
                    continue
                raise
            data: dict[str, Any] = rotated.get("data") or {}
            return data
        raise Unavailable(
            f"vault: transit rotate kept conflicting ({_ROTATE_ATTEMPTS} attempts)", backend=BACKEND
        )

    async def encrypt(self, key: KeyRef, ref: str, plaintext: bytes, context: Context) -> bytes:
        """Concurrent encryptions under one key version share a transit batch_input call."""
        if not self._coalesce:
            return _only(await self.encrypt_batch(key, ref, [(plaintext, context)]))
        return await self._encrypts.submit((key, ref), (plaintext, context))

    async def decrypt(self, key: KeyRef, ref: str, payload: bytes, context: Context) -> bytes:
        """Concurrent decryptions with one key share a transit batch_input call."""
        if not self._coalesce:
            return _only(await self.decrypt_batch(key, [(ref, payload, context)]))
        return await self._decrypts.submit(key, (ref, payload, context))

    async def encrypt_batch(
        self, key: KeyRef, ref: str, items: Sequence[tuple[bytes, Context]]
    ) -> list[bytes | BrokerError]:
        batch = []
        for plaintext, context in items:
            entry: dict[str, Any] = {"plaintext": _b64(plaintext), "key_version": int(ref)}
            aad = canonical_context(context)
            if aad:
                entry["associated_data"] = _b64(aad)
            batch.append(entry)
        out = await self._client.request(
            "POST",
            self._path("encrypt", key.name),
            # A partial failure would otherwise be a 400 for the whole batch.
            {"batch_input": batch, "partial_failure_response_code": 200},
            what="transit encrypt batch",
        )
        results: list[bytes | BrokerError] = []
        for item in _batch_results(out, len(items)):
            if item.get("error") or not item.get("ciphertext"):
                results.append(BadGateway(f"vault: transit encrypt: {item.get('error')}", backend=BACKEND))
            else:
                results.append(_transit_payload(item["ciphertext"]))
        return results

    async def decrypt_batch(
        self, key: KeyRef, items: Sequence[tuple[str, bytes, Context]]
    ) -> list[bytes | BrokerError]:
        batch = []
        for ref, payload, context in items:
            entry: dict[str, Any] = {"ciphertext": _transit_ciphertext(ref, payload)}
            aad = canonical_context(context)
            if aad:
                entry["associated_data"] = _b64(aad)
            batch.append(entry)
        try:
            out = await self._client.request(
                "POST",
                self._path("decrypt", key.name),
                {"batch_input": batch, "partial_failure_response_code": 200},
                what="transit decrypt batch",
            )
        except BadGateway as exc:
            # Transit still answers 400 when every item failed; each was a decryption failure.
            if vault_status(exc) == 400:
                return [DecryptionFailed() for _ in items]
            raise
        results: list[bytes | BrokerError] = []
        for item in _batch_results(out, len(items)):
            if item.get("error") or "plaintext" not in item:
                results.append(DecryptionFailed())
            else:
                results.append(base64.b64decode(item["plaintext"]))
        return results

    async def reencrypt(
        self, key: KeyRef, src_ref: str, dst_ref: str, payload: bytes, context: Context
    ) -> bytes:
        if canonical_context(context):
            # Transit's rewrap takes no associated_data: with a context the broker
            # decrypts and encrypts itself; the plaintext stays in this process.
            plaintext = await self.decrypt(key, src_ref, payload, context)
            return await self.encrypt(key, dst_ref, plaintext, context)
        body = {"ciphertext": _transit_ciphertext(src_ref, payload), "key_version": int(dst_ref)}
        try:
            out = await self._client.request(
                "POST", self._path("rewrap", key.name), body, what="transit rewrap"
            )
        except BadGateway as exc:
            if vault_status(exc) == 400:
                raise DecryptionFailed() from exc
            raise
        return _transit_payload(out["data"]["ciphertext"])

    async def data_key(self, key: KeyRef, ref: str, nbytes: int, context: Context) -> tuple[bytes, bytes]:
        if nbytes not in _DATAKEY_BITS:
            raise UnsupportedOperation(f"vault: data keys are 16, 32 or 64 bytes, not {nbytes}")
        body: dict[str, Any] = {"bits": _DATAKEY_BITS[nbytes], "key_version": int(ref)}
        aad = canonical_context(context)
        if aad:
            body["associated_data"] = _b64(aad)
        out = await self._client.request(
            "POST", vault_path(f"{self._mount}/datakey/plaintext", key.name), body, what="transit datakey"
        )
        data = out["data"]
        return base64.b64decode(data["plaintext"]), _transit_payload(data["ciphertext"])

    async def sign(self, key: KeyRef, ref: str, digest: bytes) -> bytes:
        body = {
            "input": _b64(digest),
            "prehashed": True,
            "hash_algorithm": "sha2-256",
            "key_version": int(ref),
            "marshaling_algorithm": "asn1",
        }
        out = await self._client.request("POST", self._path("sign", key.name), body, what="transit sign")
        return _transit_payload(out["data"]["signature"])

    async def verify(self, key: KeyRef, ref: str, digest: bytes, signature: bytes) -> bool:
        body = {
            "input": _b64(digest),
            "prehashed": True,
            "hash_algorithm": "sha2-256",
            "signature": _transit_ciphertext(ref, signature),
            "marshaling_algorithm": "asn1",
        }
        try:
            out = await self._client.request(
                "POST", self._path("verify", key.name), body, what="transit verify"
            )
        except BadGateway as exc:
            if vault_status(exc) == 400:  # a malformed signature is an invalid one
                return False
            raise
        return bool(out["data"]["valid"])

    async def set_enabled(self, key: KeyRef, refs: Sequence[str], enabled: bool) -> None:
        # Transit has no disable switch; the broker refuses operations on a suspended key itself.
        return None

    async def set_min_decryption(self, key: KeyRef, refs: Sequence[str]) -> None:
        if not refs:
            return
        await self._client.request(
            "POST",
            self._path("keys", key.name, "config"),
            {"min_decryption_version": min(int(r) for r in refs)},
            what="transit config",
        )

    async def schedule_destruction(self, key: KeyRef, refs: Sequence[str], pending_days: int) -> None:
        # Transit deletes at once; the broker keeps the window and calls destroy() when it ends.
        return None

    async def cancel_destruction(self, key: KeyRef, refs: Sequence[str]) -> None:
        return None

    async def destroy(self, key: KeyRef, refs: Sequence[str]) -> None:
        path = self._path("keys", key.name)
        try:
            await self._client.request(
                "POST",
                self._path("keys", key.name, "config"),
                {"deletion_allowed": True},
                what="transit config",
            )
        except NotFound:
            return
        await self._client.request("DELETE", path, what="transit delete key")
