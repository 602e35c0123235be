"""AWS KMS through boto3: one client built at start-up, calls run off the event loop.

With ``kms.endpoint`` empty the client talks to real AWS for the region, with
credentials from the standard AWS chain; the endpoint is set only for a stand-in.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from broker.backends._blocking import run_blocking
from broker.backends.base import Context, KeyRef, PerItemBatches
from broker.config.model import KmsConfig
from broker.errors import (
    BackendError,
    BackendTimeout,
    BadGateway,
    BrokerError,
    DecryptionFailed,
    NotFound,
    OutcomeUnknown,
    Unavailable,
)
from broker.requestvars import note_backend_call
from broker.vocab import Backend, KeyType

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

BACKEND = "kms"
T = TypeVar("T")

# botocore error codes, grouped by what they mean to a broker caller.
_UNAVAILABLE_CODES = {"KMSInternalException", "DependencyTimeoutException", "ThrottlingException"}
_NOT_FOUND_CODES = {"NotFoundException"}
_DENIED_CODES = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
}


class _Said(TypedDict):
    backend: str
    upstream_status: int | None
    upstream_code: str
    reasons: tuple[str, ...]


def _said(exc: botocore.exceptions.ClientError, code: str) -> _Said:
    """What KMS answered, kept on the broker error so nobody reads the botocore one again."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = str(exc.response.get("Error", {}).get("Message", ""))
    return {
        "backend": BACKEND,
        "upstream_status": status if isinstance(status, int) else None,
        "upstream_code": code,
        "reasons": (message,) if message else (),
    }


@contextlib.contextmanager
def map_botocore_errors(what: str) -> Iterator[None]:
    """Translate botocore failures into broker errors at the seam."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND_CODES:
            raise NotFound(f"kms: {what}: not found") from exc
        said = _said(exc, code)
        if code in _UNAVAILABLE_CODES:
            raise Unavailable(f"kms: {what}: {code}", **said) from exc
        if code in _DENIED_CODES:
            # The broker's own AWS identity was refused: a deployment fault, not the caller's.
            raise Unavailable(f"kms: {what}: the broker's credentials were refused ({code})", **said) from exc
        raise BadGateway(f"kms: {what}: {code or 'error'}", **said) from exc
    except (botocore.exceptions.ConnectTimeoutError, botocore.exceptions.ReadTimeoutError) as exc:
        raise BackendTimeout(f"kms: {what}: timed out", backend=BACKEND) from exc
    except (
        botocore.exceptions.EndpointConnectionError,
        botocore.exceptions.ConnectionClosedError,
    ) as exc:
        raise Unavailable(f"kms: {what}: cannot connect", backend=BACKEND) from exc
    except botocore.exceptions.NoCredentialsError as exc:
        raise Unavailable(
            f"kms: {what}: no AWS credentials available to the broker", backend=BACKEND
        ) from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise BadGateway(f"kms: {what}: {exc.__class__.__name__}", backend=BACKEND) from exc


_SENT_NO_ANSWER = (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError)


def _answered_not_done(exc: BackendError) -> bool:
    """KMS answered with a refusal worth retrying: throttled, or a 5xx (KMSInternalException)."""
    if not isinstance(exc.__cause__, botocore.exceptions.ClientError):
        return False
    status = exc.upstream_status
    return exc.upstream_code == "ThrottlingException" or (status is not None and status >= 500)


class KmsClient:
    """The broker's KMS access; blocking boto3 calls go to a bounded thread pool."""

    def __init__(self, config: KmsConfig) -> None:
        self._config = config
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kms")
        self._client: KMSClient | None = None
        # For calls that create something: botocore must not send them again after a timeout
        # (CreateKey has no client token: a resend that the first try also reached makes two keys).
        self._once: KMSClient | None = None

    async def start(self) -> None:
        # Building a client reads endpoint data from disk: keep it off the loop.
        self._client = await run_blocking(
            self._executor, self._build, deadline=30, backend=BACKEND, what="client set-up"
        )
        self._once = await run_blocking(
            self._executor,
            functools.partial(self._build, attempts=1),
            deadline=30,
            backend=BACKEND,
            what="client set-up",
        )

    def _build(self, attempts: int | None = None) -> KMSClient:
        cfg = botocore.config.Config(
            region_name=self._config.region,
            connect_timeout=self._config.timeout_seconds,
            read_timeout=self._config.timeout_seconds,
            # Attempts in all, the first included (botocore's own "max_attempts" counts only the
            # retries: 1 there would still send a CreateKey twice).
            retries={"total_max_attempts": attempts or self._config.max_attempts, "mode": "standard"},
            max_pool_connections=16,
        )
        kwargs: dict[str, Any] = {"config": cfg}
        if self._config.endpoint:
            kwargs["endpoint_url"] = self._config.endpoint
        client: KMSClient = boto3.session.Session().client("kms", **kwargs)
        return client

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def call(self, what: str, fn: Callable[[KMSClient], T], *, repeatable: bool = True) -> T:
        """Run one SDK call off the loop, translated at the seam, its request id noted for audit.

        ``repeatable=False`` (the call creates something): sent once, never retried by botocore,
        and a timeout is :class:`OutcomeUnknown` rather than a 503 to retry.
        """
        client = self._client if repeatable else self._once
        if client is None:
            raise Unavailable("kms client is not started", backend=BACKEND)

        def run() -> T:
            attempt = 0
            while True:
                attempt += 1
                try:
                    with map_botocore_errors(what):
                        out = fn(client)
                    break
                except BackendError as exc:
                    if repeatable:
                        raise
                    if isinstance(exc.__cause__, _SENT_NO_ANSWER):
                        # Sent, then no answer: KMS may have done it. (No connection, or a
                        # connect timeout: nothing reached KMS, an ordinary 503.)
                        raise OutcomeUnknown(
                            f"{exc.detail}; KMS may still carry it out: nothing was recorded, read "
                            "the key before trying again",
                            backend=BACKEND,
                        ) from exc
                    # KMS answered that it did not do it (throttled, an internal error: AWS says
                    # to retry those): tried again here, as botocore does for every other call.
                    if attempt >= self._config.max_attempts or not _answered_not_done(exc):
                        raise
                    time.sleep(random.uniform(0, min(0.1 * 2**attempt, 1.0)))  # noqa: S311 - jitter
            meta = out.get("ResponseMetadata", {}) if isinstance(out, dict) else {}
            note_backend_call(BACKEND, what, str(meta.get("RequestId", "")))
            return out

        return await run_blocking(
            self._executor,
            run,
            deadline=self._config.deadline_seconds,
            backend=BACKEND,
            what=what,
            repeatable=repeatable,
        )

    async def health(self) -> dict[str, Any]:
        client = self._client
        if client is None:
            raise Unavailable("kms client is not started", backend=BACKEND)

        def probe() -> None:
            with map_botocore_errors("list keys"):
                client.list_keys(Limit=1)

        # botocore's own timeouts and retries bound the thread; the deadline bounds the caller.
        await run_blocking(
            self._executor, probe, deadline=self._config.deadline_seconds, backend=BACKEND, what="list keys"
        )
        return {
            "ok": True,
            "region": self._config.region,
            "endpoint": self._config.endpoint or "aws",
        }


_KMS_SPECS = {
    KeyType.AES256_GCM: ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"),
    KeyType.ECDSA_P256: ("ECC_NIST_P256", "SIGN_VERIFY"),
}
# A ciphertext that is not this key's, was altered, or carries another context.
_DECRYPT_FAILURES = {"InvalidCiphertextException", "IncorrectKeyException"}


class KmsKeys(PerItemBatches):
    """Keys in AWS KMS, one KMS key per broker version; the material reference is the KeyId.

    Why not KMS's own rotation: a rotated KMS key keeps every backing key under one
    KeyId with no way to retire one version (``min_decrypt_version``), to name the
    version that encrypts, or to destroy one version's material. One KMS key per
    version gives each of those a native handle: disable, schedule deletion.
    """

    name = Backend.KMS
    key_types = frozenset(_KMS_SPECS)
    material_takes_name = False  # each version is a KMS key with its own id

    def __init__(self, client: KmsClient) -> None:
        self._kms = client

    async def _is_decrypt_failure(self, exc: BackendError, ref: str) -> bool:
        """Whether a failed decrypt was about the ciphertext, not about the broker's access.

        KMS answers a blob whose embedded key reference was altered with
        AccessDeniedException, the same code as an IAM refusal. If the broker can
        still describe the key, its access is fine and the ciphertext was at fault.
        """
        code = exc.upstream_code
        if code in _DECRYPT_FAILURES:
            return True
        if code != "AccessDeniedException":
            return False
        try:
            await self._kms.call("describe key", lambda c: c.describe_key(KeyId=ref))
        except BrokerError:
            return False
        return True

    async def create_key(self, key: KeyRef) -> str:
        # Every version is fresh material under a new id: nothing to adopt by name.
        return await self.create_version(key)

    async def finish_create(self, key: KeyRef, since: datetime) -> str:
        # Material made late for a lost creation cannot be told from anyone's: make new (the
        # late one, if any, stays unused; it holds no version of any key).
        return await self.create_version(key)

    async def create_version(self, key: KeyRef) -> str:
        spec, usage = _KMS_SPECS[key.type]
        out = await self._kms.call(
            "create key",
            repeatable=False,
            fn=lambda c: c.create_key(
                KeySpec=spec,  # type: ignore[arg-type]
                KeyUsage=usage,  # type: ignore[arg-type]
                Description=f"keybroker key {key.name}",
                Tags=[{"TagKey": "keybroker:key", "TagValue": key.name}],
            ),
        )
        return str(out["KeyMetadata"]["KeyId"])

    async def encrypt(self, key: KeyRef, ref: str, plaintext: bytes, context: Context) -> bytes:
        out = await self._kms.call(
            "encrypt",
            lambda c: c.encrypt(KeyId=ref, Plaintext=plaintext, EncryptionContext=dict(context)),
        )
        return bytes(out["CiphertextBlob"])

    async def decrypt(self, key: KeyRef, ref: str, payload: bytes, context: Context) -> bytes:
        try:
            out = await self._kms.call(
                "decrypt",
                lambda c: c.decrypt(KeyId=ref, CiphertextBlob=payload, EncryptionContext=dict(context)),
            )
        except (BadGateway, Unavailable) as exc:
            if await self._is_decrypt_failure(exc, ref):
                raise DecryptionFailed() from exc
            raise
        return bytes(out["Plaintext"])

    async def reencrypt(
        self, key: KeyRef, src_ref: str, dst_ref: str, payload: bytes, context: Context
    ) -> bytes:
        try:
            out = await self._kms.call(
                "re-encrypt",
                lambda c: c.re_encrypt(
                    CiphertextBlob=payload,
                    SourceKeyId=src_ref,
                    SourceEncryptionContext=dict(context),
                    DestinationKeyId=dst_ref,
                    DestinationEncryptionContext=dict(context),
                ),
            )
        except (BadGateway, Unavailable) as exc:
            if await self._is_decrypt_failure(exc, src_ref):
                raise DecryptionFailed() from exc
            raise
        return bytes(out["CiphertextBlob"])

    async def data_key(self, key: KeyRef, ref: str, nbytes: int, context: Context) -> tuple[bytes, bytes]:
        out = await self._kms.call(
            "generate data key",
            lambda c: c.generate_data_key(KeyId=ref, NumberOfBytes=nbytes, EncryptionContext=dict(context)),
        )
        return bytes(out["Plaintext"]), bytes(out["CiphertextBlob"])

    async def sign(self, key: KeyRef, ref: str, digest: bytes) -> bytes:
        out = await self._kms.call(
            "sign",
            lambda c: c.sign(
                KeyId=ref, Message=digest, MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_256"
            ),
        )
        return bytes(out["Signature"])

    async def verify(self, key: KeyRef, ref: str, digest: bytes, signature: bytes) -> bool:
        try:
            out = await self._kms.call(
                "verify",
                lambda c: c.verify(
                    KeyId=ref,
                    Message=digest,
                    MessageType="DIGEST",
                    Signature=signature,
                    SigningAlgorithm="ECDSA_SHA_256",
                ),
            )
        except BadGateway as exc:
            if exc.upstream_code in ("KMSInvalidSignatureException", "ValidationException"):
                return False
            raise
        return bool(out["SignatureValid"])

    async def _each(self, what: str, refs: Sequence[str], op: Callable[[KMSClient, str], object]) -> None:
        for ref in refs:
            await self._kms.call(what, functools.partial(lambda c, r: op(c, r), r=ref))

    async def set_enabled(self, key: KeyRef, refs: Sequence[str], enabled: bool) -> None:
        if enabled:
            await self._each("enable key", refs, lambda c, key_id: c.enable_key(KeyId=key_id))
        else:
            await self._each("disable key", refs, lambda c, key_id: c.disable_key(KeyId=key_id))

    async def set_min_decryption(self, key: KeyRef, refs: Sequence[str]) -> None:
        # KMS has no per-version switch short of disabling the version's key, and a
        # disabled key could not serve an administrator's rewrap-away; the broker
        # refuses retired versions before KMS is asked.
        return None

    async def schedule_destruction(self, key: KeyRef, refs: Sequence[str], pending_days: int) -> None:
        await self._each(
            "schedule key deletion",
            refs,
            lambda c, key_id: c.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=pending_days),
        )

    async def cancel_destruction(self, key: KeyRef, refs: Sequence[str]) -> None:
        # KMS leaves a cancelled key disabled, which matches the broker's "suspended".
        await self._each("cancel key deletion", refs, lambda c, key_id: c.cancel_key_deletion(KeyId=key_id))

    async def key_state(self, ref: str) -> str | None:
        """KMS's own state of one version's key (None once KMS has deleted it)."""
        try:
            meta = await self._kms.call("describe key", lambda c: c.describe_key(KeyId=ref))
        except NotFound:
            return None
        return str(meta["KeyMetadata"]["KeyState"])

    async def destroy(self, key: KeyRef, refs: Sequence[str]) -> None:
        # KMS deletes the material itself when the window it was given ends; make sure
        # each version is on that path (it is, unless someone cancelled it behind our back).
        for ref in refs:
            if await self.key_state(ref) not in (None, "PendingDeletion", "PendingReplicaDeletion"):
                await self._each(
                    "schedule key deletion",
                    [ref],
                    lambda c, key_id: c.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7),
                )
