"""Client settings shared by the sync and async clients: addresses, TLS, the retry policy.

Pure logic (no I/O besides reading certificate files), so the retry and backoff rules are
unit-tested without a network.
"""

from __future__ import annotations

import email.utils
import os
import random
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.sdk.errors import ConfigurationError

ENV_ADDR = "KEYBROKER_ADDR"
ENV_CACERT = "KEYBROKER_CACERT"
ENV_CLIENT_CERT = "KEYBROKER_CLIENT_CERT"
ENV_CLIENT_KEY = "KEYBROKER_CLIENT_KEY"


def parse_addresses(value: str | Sequence[str]) -> tuple[str, ...]:
    """Broker URLs from a comma-separated string or a sequence; each ``https://host[:port]``."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for raw in items:
        text = raw.strip().rstrip("/")
        if not text:
            continue
        parts = urllib.parse.urlsplit(text)
        if "@" in parts.netloc:
            # user:password@ would be repeated in every error and log line naming the address
            # (and sent as Basic auth by aiohttp); the broker authenticates by certificate only.
            raise ConfigurationError("a broker address must be https://HOST[:PORT], without user:password@")
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            raise ConfigurationError(f"a broker address must be https://HOST[:PORT], got {raw.strip()!r}")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in range
        except ValueError:
            raise ConfigurationError(f"a broker address has a bad port: {raw.strip()!r}") from None
        if text not in out:
            out.append(text)
    if not out:
        raise ConfigurationError("no broker address given (KEYBROKER_ADDR or addresses=)")
    return tuple(out)


def tls_context(ca_cert: str | Path, client_cert: str | Path, client_key: str | Path) -> ssl.SSLContext:
    """A client context that verifies the broker against ``ca_cert`` and presents a certificate."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(client_cert), str(client_key))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc.__class__.__name__
        raise ConfigurationError(
            f"cannot use the CA {ca_cert} with the certificate {client_cert} and key {client_key}: {reason}"
        ) from None
    return ctx


def resolve(
    addresses: str | Sequence[str] | None,
    ssl_context: ssl.SSLContext | None,
    ca_cert: str | Path | None,
    client_cert: str | Path | None,
    client_key: str | Path | None,
    environ: Mapping[str, str] | None = None,
) -> tuple[tuple[str, ...], ssl.SSLContext]:
    """Addresses and TLS context from the arguments, each missing one from the KEYBROKER_* variables."""
    env = os.environ if environ is None else environ
    found = addresses if addresses is not None else env.get(ENV_ADDR, "")
    urls = parse_addresses(found)
    if ssl_context is not None:
        return urls, ssl_context
    files = {
        ENV_CACERT: ca_cert or env.get(ENV_CACERT),
        ENV_CLIENT_CERT: client_cert or env.get(ENV_CLIENT_CERT),
        ENV_CLIENT_KEY: client_key or env.get(ENV_CLIENT_KEY),
    }
    missing = [name for name, value in files.items() if not value]
    if missing:
        raise ConfigurationError(f"missing TLS settings: {', '.join(missing)} (or pass them as arguments)")
    return urls, tls_context(*(str(v) for v in files.values()))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before trying again.

    One *round* tries each address once, from the last one that answered; ``retries`` more
    rounds follow, each after a jittered exponential pause ("full jitter": uniform between 0
    and ``backoff * 2**round``, capped at ``max_backoff``), never shorter than a server's
    ``Retry-After``. A ``Retry-After`` beyond ``max_retry_after`` is not waited for: the
    error is raised at once, so a caller is never parked for minutes inside one call.
    """

    retries: int = 3
    backoff: float = 0.1
    max_backoff: float = 5.0
    max_retry_after: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ConfigurationError("retry settings must not be negative")

    def pause(
        self, round_: int, retry_after: float | None, rand: Callable[[], float] = random.random
    ) -> float | None:
        """Seconds to wait before round ``round_ + 1``, or None when no further round should run."""
        if round_ >= self.retries:
            return None
        if retry_after is not None and retry_after > self.max_retry_after:
            return None
        ceiling = min(self.max_backoff, self.backoff * 2.0**round_)
        jittered = rand() * ceiling
        return max(jittered, retry_after or 0.0)


def retry_after_seconds(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """A ``Retry-After`` header as seconds from now (delta-seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(min(int(text), 86400))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, float(when.timestamp() - now()))
