"""The SDK's one exception tree, mirroring the broker's problem+json ``code`` (and status).

::

    KeybrokerError                 .status .code .detail .request_id
    ├── InvalidInput               400 bad_request, invalid_key_name, invalid_text, json_too_deep,
    │                                  invalid_policy, unsupported_operation, 422
    ├── DecryptionFailed           400 decryption_failed (wrong key, context or a tampered ciphertext)
    ├── Unauthenticated            401 unauthenticated, certificate_revoked
    ├── Forbidden                  403 forbidden
    ├── NotFound                   404 not_found
    ├── Conflict                   409 conflict, idempotency_* (a policy version, a name taken)
    │   └── KeyStateError          409 on a key: its state forbids the operation
    ├── PayloadTooLarge            413 payload_too_large
    ├── RateLimited                429 rate_limited
    ├── Unavailable                503 backend_unavailable, policy_invalid, crl_unavailable, ...
    ├── BackendError               502 backend_error, 500 internal_error and any other 5xx
    ├── Timeout                    504 backend_timeout, 408 request_timeout
    │   └── OutcomeUnknown         504 outcome_unknown: a change may or may not have been made
    ├── TransportError             no answer: refused, reset, timed out, TLS failed (status 0)
    ├── UnexpectedResponse         an answer that is not what the API promises (status kept)
    └── ConfigurationError         the client's own settings (addresses, certificate files)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendError",
    "ConfigurationError",
    "Conflict",
    "DecryptionFailed",
    "Forbidden",
    "InvalidInput",
    "KeyStateError",
    "KeybrokerError",
    "NotFound",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "RateLimited",
    "Timeout",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "UnexpectedResponse",
    "error_from_problem",
]


class KeybrokerError(Exception):
    """Root of every error the SDK raises; ``str()`` is one readable line."""

    def __init__(self, status: int, code: str, detail: str, request_id: str = "") -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.request_id = request_id
        head = f"{status} {code}: " if status else ""
        super().__init__(head + detail + (f" (request {request_id})" if request_id else ""))

    # The names the CLI's own client used for the same fields, for code written against it.
    @property
    def http_status(self) -> int:
        return self.status

    @property
    def problem_code(self) -> str:
        return self.code

    @property
    def problem_detail(self) -> str:
        return self.detail


class InvalidInput(KeybrokerError):
    pass


class DecryptionFailed(KeybrokerError):
    pass


class Unauthenticated(KeybrokerError):
    pass


class Forbidden(KeybrokerError):
    pass


class NotFound(KeybrokerError):
    pass


class Conflict(KeybrokerError):
    pass


class KeyStateError(Conflict):
    pass


class PayloadTooLarge(KeybrokerError):
    pass


class RateLimited(KeybrokerError):
    pass


class Unavailable(KeybrokerError):
    pass


class BackendError(KeybrokerError):
    pass


class Timeout(KeybrokerError):
    pass


class OutcomeUnknown(Timeout):
    """A change the backend did not confirm in time: it may still be carried out. Never retried
    by the SDK; read the key (``get_key``) to see where it stands before sending it again."""


class TransportError(KeybrokerError):
    """No answer from any broker address (or none that could be trusted: TLS failed)."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, "unreachable", detail)


class UnexpectedResponse(KeybrokerError):
    pass


class ConfigurationError(KeybrokerError):
    def __init__(self, detail: str) -> None:
        super().__init__(0, "configuration", detail)


_BY_CODE: dict[str, type[KeybrokerError]] = {
    "decryption_failed": DecryptionFailed,
    "bad_request": InvalidInput,
    "invalid_key_name": InvalidInput,
    "invalid_text": InvalidInput,
    "json_too_deep": InvalidInput,
    "invalid_policy": InvalidInput,
    "unsupported_operation": InvalidInput,
    "expectation_failed": InvalidInput,
    "unauthenticated": Unauthenticated,
    "certificate_revoked": Unauthenticated,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "payload_too_large": PayloadTooLarge,
    "rate_limited": RateLimited,
    "backend_unavailable": Unavailable,
    "policy_invalid": Unavailable,
    "crl_unavailable": Unavailable,
    "backend_timeout": Timeout,
    "outcome_unknown": OutcomeUnknown,
    "request_timeout": Timeout,
    "backend_error": BackendError,
    "internal_error": BackendError,
}

_BY_STATUS: dict[int, type[KeybrokerError]] = {
    400: InvalidInput,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    408: Timeout,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidInput,
    429: RateLimited,
    503: Unavailable,
    504: Timeout,
}

# At most this much of a detail is kept: an error line must stay a line, whatever a server sends.
_DETAIL_MAX = 1000


def _text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else ""
    # Control characters from the network never reach a terminal or a log line as such.
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def error_from_problem(status: int, doc: Any, path: str = "") -> KeybrokerError:
    """The exception an error answer stands for: by its problem ``code``, else by its status.

    A 409 ``conflict`` on a key's own endpoints (``/v1/keys/NAME...``, grants aside) is the key's
    state refusing the operation; elsewhere (a name taken, a policy version moved on) a plain
    :class:`Conflict`.
    """
    problem = doc if isinstance(doc, dict) else {}
    code = _text(problem.get("code"), 64) or "error"
    detail = _text(problem.get("detail") or problem.get("title"), _DETAIL_MAX) or "no detail"
    request_id = _text(problem.get("request_id"), 128)
    kind = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if kind is None:
        kind = BackendError if status >= 500 else InvalidInput if 400 <= status < 500 else UnexpectedResponse
    if kind is Conflict and code == "conflict" and _on_a_key(path):
        kind = KeyStateError
    return kind(status, code, detail, request_id)


def _on_a_key(path: str) -> bool:
    parts = path.split("?", 1)[0].strip("/").split("/")
    return len(parts) >= 3 and parts[:2] == ["v1", "keys"] and "grants" not in parts
