"""AWS KMS through boto3: one client built at start-up, calls run off the event loop.

With ``kms.endpoint`` empty the client talks to real AWS for the region, with
credentials from the standard AWS chain; the endpoint is set only for a stand-in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions

from broker.backends._blocking import run_blocking
from broker.config.model import KmsConfig
from broker.errors import BackendTimeout, BadGateway, NotFound, Unavailable

if TYPE_CHECKING:
    from mypy_boto3_kms import KMSClient

BACKEND = "kms"

# botocore error codes, grouped by what they mean to a broker caller.
_UNAVAILABLE_CODES = {"KMSInternalException", "DependencyTimeoutException", "ThrottlingException"}
_NOT_FOUND_CODES = {"NotFoundException"}
_DENIED_CODES = {
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidSignatureException",
}


@contextlib.contextmanager
def map_botocore_errors(what: str) -> Iterator[None]:
    """Translate botocore failures into broker errors at the seam."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _NOT_FOUND_CODES:
            raise NotFound(f"kms: {what}: not found") from exc
        if code in _UNAVAILABLE_CODES:
            raise Unavailable(f"kms: {what}: {code}", backend=BACKEND) from exc
        if code in _DENIED_CODES:
            # The broker's own AWS identity was refused: a deployment fault, not the caller's.
            raise Unavailable(
                f"kms: {what}: the broker's credentials were refused ({code})", backend=BACKEND
            ) from exc
        raise BadGateway(f"kms: {what}: {code or 'error'}", backend=BACKEND) from exc
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


class KmsClient:
    """The broker's KMS access; blocking boto3 calls go to a bounded thread pool."""

    def __init__(self, config: KmsConfig) -> None:
        self._config = config
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="kms")
        self._client: KMSClient | None = None

    async def start(self) -> None:
        # Building a client reads endpoint data from disk: keep it off the loop.
        self._client = await run_blocking(
            self._executor, self._build, deadline=30, backend=BACKEND, what="client set-up"
        )

    def _build(self) -> KMSClient:
        cfg = botocore.config.Config(
            region_name=self._config.region,
            connect_timeout=self._config.timeout_seconds,
            read_timeout=self._config.timeout_seconds,
            retries={"max_attempts": self._config.max_attempts, "mode": "standard"},
            max_pool_connections=16,
        )
        kwargs: dict[str, Any] = {"config": cfg}
        if self._config.endpoint:
            kwargs["endpoint_url"] = self._config.endpoint
        client: KMSClient = boto3.session.Session().client("kms", **kwargs)
        return client

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def health(self) -> dict[str, Any]:
        client = self._client
        if client is None:
            raise Unavailable("kms client is not started", backend=BACKEND)

        def probe() -> None:
            with map_botocore_errors("list keys"):
                client.list_keys(Limit=1)

        # botocore's own timeouts and retries bound the thread; the deadline bounds the caller.
        deadline = self._config.timeout_seconds * (self._config.max_attempts + 1)
        await run_blocking(self._executor, probe, deadline=deadline, backend=BACKEND, what="list keys")
        return {
            "ok": True,
            "region": self._config.region,
            "endpoint": self._config.endpoint or "aws",
        }
