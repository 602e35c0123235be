"""Every error the broker reports, and the HTTP status each one maps to.

::

    BrokerError                      status  code
    ├── ClientError                  4xx     the caller can fix it
    │   ├── BadRequest               400     bad_request
    │   │   └── DecryptionFailed     400     decryption_failed (never carries detail)
    │   ├── Unauthenticated          401     unauthenticated
    │   ├── Forbidden                403     forbidden
    │   ├── NotFound                 404     not_found
    │   ├── MethodNotAllowed         405     method_not_allowed
    │   ├── Conflict                 409     conflict (key state forbids it)
    │   ├── PayloadTooLarge          413     payload_too_large
    │   └── RateLimited              429     rate_limited
    ├── BackendError                 5xx     a backend or a dependency cannot serve
    │   ├── BadGateway               502     backend_error (backend answered nonsense)
    │   ├── Unavailable              503     backend_unavailable (sealed, unreachable)
    │   │   └── BackendTimeout       503     backend_unavailable (past its deadline)
    │   └── OutcomeUnknown           504     outcome_unknown (a change past its deadline)
    └── ConfigError                  —       the broker cannot start; never reaches HTTP

``UnsupportedOperation`` (a ``ClientError``, 400) is raised by a backend asked
for something its key type or product cannot do.

A ``BackendError`` carries what the backend said as fields (``upstream_status``,
``upstream_code``, ``reasons``), set once where the SDK error is translated, so
no caller reads ``__cause__`` to decide what happened.

One aiohttp middleware (``broker.api.middleware``) renders each as
``application/problem+json`` (RFC 9457). Anything else that escapes a handler is
rendered as an opaque 500 and logged with its traceback, never shown.
"""

from __future__ import annotations

from typing import ClassVar

PROBLEM_TYPE_BASE = "https://keybroker.dev/problems/"


class BrokerError(Exception):
    """Base of every error keybroker raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"
    # Seconds a client should wait before trying again (the Retry-After header), when that helps.
    retry_after: ClassVar[int | None] = None

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title

    @property
    def type_uri(self) -> str:
        return PROBLEM_TYPE_BASE + self.code


class ClientError(BrokerError):
    status = 400
    code = "bad_request"
    title = "Bad request"


class BadRequest(ClientError):
    pass


class DecryptionFailed(BadRequest):
    """Wrong context, tampered ciphertext, wrong key: one answer, no detail."""

    code = "decryption_failed"
    title = "Decryption failed"

    def __init__(self, detail: str = "") -> None:
        # The detail is dropped on purpose: telling which check failed is an oracle.
        del detail
        super().__init__("")


class UnsupportedOperation(ClientError):
    code = "unsupported_operation"
    title = "Operation not supported by this key"


class Unauthenticated(ClientError):
    status = 401
    code = "unauthenticated"
    title = "No verified client identity"


class Forbidden(ClientError):
    status = 403
    code = "forbidden"
    title = "Denied by policy"


class NotFound(ClientError):
    status = 404
    code = "not_found"
    title = "Not found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


class Conflict(ClientError):
    status = 409
    code = "conflict"
    title = "Key state forbids this operation"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class RateLimited(ClientError):
    status = 429
    code = "rate_limited"
    title = "Rate limited"


class BackendError(BrokerError):
    status = 502
    code = "backend_error"
    title = "Backend error"

    def __init__(
        self,
        detail: str = "",
        *,
        backend: str = "",
        upstream_status: int | None = None,
        upstream_code: str = "",
        reasons: tuple[str, ...] = (),
    ) -> None:
        super().__init__(detail)
        self.backend = backend
        # The HTTP status the backend answered (Vault, KMS), if it answered at all.
        self.upstream_status = upstream_status
        # The backend's own name for the failure: a KMS error code, a PKCS#11 exception class.
        self.upstream_code = upstream_code
        # The backend's error messages (Vault's ``errors`` list), for callers that match on them.
        self.reasons = reasons

    def says(self, status: int, text: str = "") -> bool:
        """Whether the backend answered ``status`` with a reason containing ``text``."""
        return self.upstream_status == status and (not text or any(text in r for r in self.reasons))


class BadGateway(BackendError):
    pass


class Unavailable(BackendError):
    status = 503
    code = "backend_unavailable"
    title = "Backend unavailable"
    # A Vault leader election or a node restart takes a few seconds; another replica may serve now.
    retry_after: ClassVar[int | None] = 2


class BackendTimeout(Unavailable):
    """A backend call past its deadline (Vault, KMS, HSM alike): to the caller the backend is
    unavailable for now, so the same 503 + Retry-After as an unreachable one, never a held request."""

    title = "Backend did not answer in time"


class OutcomeUnknown(BackendError):
    """A change (a key or version created) sent to a backend that did not answer within its
    deadline: the backend may still carry it out. Not a 503: a client must not simply send the
    change again (each try could leave one more backend key nobody records); the SDK never
    retries it by itself. What the broker recorded is unchanged: read the key to see where it is."""

    status = 504
    code = "outcome_unknown"
    title = "Backend outcome unknown"


class ConfigError(BrokerError):
    """Configuration is missing or invalid; raised at start-up, never over HTTP."""

    code = "config_error"
    title = "Invalid configuration"

    def __init__(self, detail: str, *, source: str = "", key: str = "") -> None:
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {detail}" if where else detail)
        self.source = source
        self.key = key
