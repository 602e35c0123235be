"""Every broker operation as a :class:`Call`: the request to send, whether it is safe to retry,
and how to read the answer. The sync and async clients only send these, so both have exactly
the same operations, checks and parsing.

Answers are read as hostile: a field of the wrong type or bad base64 is
:class:`~broker.sdk.errors.UnexpectedResponse`, never a ``KeyError`` deep in application code.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from broker.sdk.errors import InvalidInput, KeybrokerError, UnexpectedResponse, error_from_problem
from broker.sdk.types import DataKey, Sealed, Signature

T = TypeVar("T")

# An answer bigger than this is refused unread (the largest real one is a full audit page).
MAX_RESPONSE_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True)
class Response:
    """One HTTP answer, from the broker at ``address``; header names in lower case."""

    status: int
    headers: Mapping[str, str]
    # repr=False: a decrypt's or a data key's answer holds plaintext; it must not reach a log.
    body: bytes = field(repr=False)
    address: str = ""

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError:
            if self.status >= 400:
                # A proxy's or a dying server's page: kept (shortened) as the error's detail.
                return {"detail": self.body[:200].decode(errors="replace")}
            raise UnexpectedResponse(self.status, "bad_json", "the broker's answer is not JSON") from None

    def problem(self, path: str) -> KeybrokerError:
        return error_from_problem(self.status, self.json(), path)


def _json_body(resp: Response) -> Any:
    return resp.json()


# The broker's rule for the header (broker/api/idempotency.py): visible ASCII, 1-255 characters.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request. ``safe``: may be sent again after an unknown outcome (a read, a crypto
    operation); a call with an ``idempotency_key`` is safe too where the client allows it."""

    method: str
    path: str
    parse: Callable[[Response], T]
    body: Any = field(default=None, repr=False)  # an encrypt's plaintext (base64)
    safe: bool = False
    ok: tuple[int, ...] = ()
    idempotency_key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The broker's rule, checked before sending: a newline or a non-Latin-1 character would
        # otherwise fail inside the HTTP library, and any other value earns a 400 anyway.
        key = self.idempotency_key
        if key is not None and not (isinstance(key, str) and _IDEMPOTENCY_KEY.fullmatch(key)):
            detail = "an Idempotency-Key is 1-255 visible ASCII characters"
            raise InvalidInput(0, "invalid_idempotency_key", detail)

    def payload(self) -> bytes | None:
        return None if self.body is None else json.dumps(self.body).encode()

    def request_headers(self) -> dict[str, str]:
        out = {"Accept": "application/json", **self.headers}
        if self.body is not None:
            out["Content-Type"] = "application/json"
        if self.idempotency_key is not None:
            out["Idempotency-Key"] = self.idempotency_key
        return out


# -- input checks and answer readers ------------------------------------------------------


def seg(value: str, what: str) -> str:
    """One path segment, every reserved character encoded; '.' and '..' refused (a URL
    library would resolve them and send the request to another endpoint)."""
    if not isinstance(value, str) or value in ("", ".", ".."):
        raise InvalidInput(0, "bad_request", f"{what} must be a non-empty name, got {value!r}")
    try:
        return urllib.parse.quote(value, safe="")
    except UnicodeEncodeError:  # a lone surrogate: no URL can carry it
        raise InvalidInput(0, "bad_request", f"{what} is not valid Unicode text") from None


def _context(context: Mapping[str, str] | None) -> dict[str, str]:
    if context is None:
        return {}
    if not isinstance(context, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise InvalidInput(0, "bad_request", "an encryption context maps strings to strings")
    return dict(context)


def _bytes(value: bytes, what: str) -> str:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidInput(0, "bad_request", f"{what} must be bytes, got {type(value).__name__}")
    return base64.b64encode(bytes(value)).decode()


def _field(doc: Any, name: str, kind: type[T]) -> T:
    value = doc.get(name) if isinstance(doc, dict) else None
    # bool is an int to Python, never a version number to the API.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UnexpectedResponse(0, "bad_answer", f"the broker's answer has no {kind.__name__} {name!r}")
    return value


def _b64field(doc: Any, name: str) -> bytes:
    try:
        return base64.b64decode(_field(doc, name, str), validate=True)
    except (binascii.Error, ValueError):
        raise UnexpectedResponse(0, "bad_answer", f"the broker's {name!r} is not base64") from None


def key_of(ciphertext: str, fallback: str) -> str:
    """The key a kb1 envelope names (``kb1:<key>:<version>:<payload>``), else ``fallback``."""
    parts = ciphertext.split(":", 3)
    return parts[1] if len(parts) == 4 and parts[0] == "kb1" and parts[1] else fallback


def _sealed(doc: Any, key: str) -> Sealed:
    text = _field(doc, "ciphertext", str)
    named = doc.get("key") if isinstance(doc.get("key"), str) else key_of(text, key)
    return Sealed(text, _field(doc, "key_version", int), named)


def _items(doc: Any) -> list[Any]:
    batch = doc.get("batch") if isinstance(doc, dict) else None
    if not isinstance(batch, list):
        raise UnexpectedResponse(0, "bad_answer", "the broker's batch answer has no list 'batch'")
    return batch


def _item_error(item: Any, path: str) -> KeybrokerError | None:
    error = item.get("error") if isinstance(item, dict) else None
    if not isinstance(error, dict):
        return None
    status = error.get("status")
    return error_from_problem(status if isinstance(status, int) else 400, error, path)


# -- the operations ----------------------------------------------------------------------


def encrypt(key: str, plaintext: bytes, context: Mapping[str, str] | None) -> Call[Sealed]:
    body = {"plaintext": _bytes(plaintext, "plaintext"), "context": _context(context)}
    return Call("POST", f"/v1/keys/{seg(key, 'key')}/encrypt", lambda r: _sealed(r.json(), key), body, True)


def decrypt(key: str, ciphertext: str, context: Mapping[str, str] | None) -> Call[bytes]:
    if not isinstance(ciphertext, str):
        raise InvalidInput(0, "bad_request", "a ciphertext is the kb1 string the broker returned")
    body = {"ciphertext": ciphertext, "context": _context(context)}
    path = f"/v1/keys/{seg(key, 'key')}/decrypt"
    return Call("POST", path, lambda r: _b64field(r.json(), "plaintext"), body, True)


BatchItem = bytes | tuple[bytes, Mapping[str, str] | None]


def _split(item: Any, context: Mapping[str, str] | None) -> tuple[Any, dict[str, str]]:
    if isinstance(item, tuple):
        value, own = item
        return value, _context(own if own is not None else context)
    return item, _context(context)


def encrypt_batch(
    key: str, items: Iterable[BatchItem], context: Mapping[str, str] | None
) -> Call[list[Sealed | KeybrokerError]]:
    """Each item is plaintext bytes, or (plaintext, its own context); ``context`` is the default."""
    batch = []
    for item in items:
        value, ctx = _split(item, context)
        batch.append({"plaintext": _bytes(value, "plaintext"), "context": ctx})
    path = f"/v1/keys/{seg(key, 'key')}/encrypt"

    def parse(resp: Response) -> list[Sealed | KeybrokerError]:
        got = _items(resp.json())
        if len(got) != len(batch):
            raise UnexpectedResponse(0, "bad_answer", "the broker answered a different number of items")
        return [_item_error(i, path) or _sealed(i, key) for i in got]

    return Call("POST", path, parse, {"batch": batch}, True)


def decrypt_batch(
    key: str, items: Iterable[str | tuple[str, Mapping[str, str] | None]], context: Mapping[str, str] | None
) -> Call[list[bytes | KeybrokerError]]:
    """Each item is a ciphertext, or (ciphertext, its own context); ``context`` is the default."""
    batch = []
    for item in items:
        value, ctx = _split(item, context)
        if not isinstance(value, str):
            raise InvalidInput(0, "bad_request", "a ciphertext is the kb1 string the broker returned")
        batch.append({"ciphertext": value, "context": ctx})
    path = f"/v1/keys/{seg(key, 'key')}/decrypt"

    def parse(resp: Response) -> list[bytes | KeybrokerError]:
        got = _items(resp.json())
        if len(got) != len(batch):
            raise UnexpectedResponse(0, "bad_answer", "the broker answered a different number of items")
        return [_item_error(i, path) or _b64field(i, "plaintext") for i in got]

    return Call("POST", path, parse, {"batch": batch}, True)


def generate_data_key(key: str, context: Mapping[str, str] | None, size: int) -> Call[DataKey]:
    if size not in (16, 32, 64):
        raise InvalidInput(0, "bad_request", f"a data key has 16, 32 or 64 bytes, not {size!r}")
    body = {"bytes": size, "context": _context(context), "include_plaintext": True}

    def parse(resp: Response) -> DataKey:
        doc = resp.json()
        sealed = _sealed(doc, key)
        plaintext = _b64field(doc, "plaintext")
        if len(plaintext) != size:
            raise UnexpectedResponse(0, "bad_answer", f"the broker's data key is not {size} bytes")
        return DataKey(plaintext, sealed.ciphertext, sealed.key_version, sealed.key)

    return Call("POST", f"/v1/keys/{seg(key, 'key')}/datakey", parse, body, True)


def generate_data_key_sealed(key: str, context: Mapping[str, str] | None, size: int) -> Call[Sealed]:
    if size not in (16, 32, 64):
        raise InvalidInput(0, "bad_request", f"a data key has 16, 32 or 64 bytes, not {size!r}")
    body = {"bytes": size, "context": _context(context), "include_plaintext": False}
    path = f"/v1/keys/{seg(key, 'key')}/datakey"
    return Call("POST", path, lambda r: _sealed(r.json(), key), body, True)


def rewrap(key: str, ciphertext: str, context: Mapping[str, str] | None, to_key: str | None) -> Call[Sealed]:
    if not isinstance(ciphertext, str):
        raise InvalidInput(0, "bad_request", "a ciphertext is the kb1 string the broker returned")
    body: dict[str, Any] = {"ciphertext": ciphertext, "context": _context(context)}
    if to_key is not None:
        seg(to_key, "to_key")
        body["to_key"] = to_key
    target = to_key or key
    path = f"/v1/keys/{seg(key, 'key')}/rewrap"
    return Call("POST", path, lambda r: _sealed(r.json(), target), body, True)


def _sign_body(message: bytes | None, digest: bytes | None) -> dict[str, str]:
    if (message is None) == (digest is None):
        raise InvalidInput(0, "bad_request", "give the message or its SHA-256 digest, exactly one")
    if digest is not None:
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise InvalidInput(0, "bad_request", "a digest is the 32 bytes of a SHA-256")
        return {"digest": _bytes(digest, "digest"), "algorithm": "ecdsa-sha256"}
    return {"message": _bytes(message, "message"), "algorithm": "ecdsa-sha256"}  # type: ignore[arg-type]


def sign(key: str, message: bytes | None, digest: bytes | None) -> Call[Signature]:
    def parse(resp: Response) -> Signature:
        doc = resp.json()
        text = _field(doc, "signature", str)
        return Signature(text, _field(doc, "key_version", int), key_of(text, key))

    return Call("POST", f"/v1/keys/{seg(key, 'key')}/sign", parse, _sign_body(message, digest), True)


def verify(key: str, signature: str, message: bytes | None, digest: bytes | None) -> Call[bool]:
    if not isinstance(signature, str):
        raise InvalidInput(0, "bad_request", "a signature is the kb1 string the broker returned")
    body = {**_sign_body(message, digest), "signature": signature}
    path = f"/v1/keys/{seg(key, 'key')}/verify"
    return Call("POST", path, lambda r: _field(r.json(), "valid", bool), body, True)


# -- keys ---------------------------------------------------------------------------------


def _dict(resp: Response) -> dict[str, Any]:
    doc = resp.json()
    if not isinstance(doc, dict):
        raise UnexpectedResponse(0, "bad_answer", "the broker's answer is not a JSON object")
    return doc


def new_idempotency_key() -> str:
    return "kb-" + uuid.uuid4().hex


def create_key(
    name: str,
    backend: str,
    environment: str,
    *,
    key_type: str | None,
    rotation_period: int | str | None,
    deletion_protection: bool | None,
    tags: Mapping[str, str] | None,
    description: str | None,
    idempotency_key: str | None,
) -> Call[dict[str, Any]]:
    seg(name, "name")
    body: dict[str, Any] = {"name": name, "backend": backend, "environment": environment}
    optional = {
        "type": key_type,
        "rotation_period": rotation_period,
        "deletion_protection": deletion_protection,
        "tags": dict(tags) if tags is not None else None,
        "description": description,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return Call("POST", "/v1/keys", _dict, body, idempotency_key=idempotency_key)


# A page of ``GET /v1/keys``: its keys and the name to ask ``after`` next (None after the last).
KeyPage = tuple[list[dict[str, Any]], str | None]


class KeyListing:
    """The pages of one listing, checked as they come (the cursor is opaque, so its order cannot
    be): names only grow from key to key and a cursor never comes back, else a broker that
    answered so would have the client page for ever."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self._cursors: set[str] = set()

    def add(self, page: list[dict[str, Any]], following: str | None) -> bool:
        """Take one page; whether another follows."""
        names = [key.get("name") if isinstance(key, dict) else None for key in page]
        last = self.keys[-1]["name"] if self.keys else ""
        for name in names:
            if not isinstance(name, str) or name <= last:
                raise UnexpectedResponse(0, "bad_answer", "the broker's key listing is out of order")
            last = name
        if following is not None and following in self._cursors:
            raise UnexpectedResponse(0, "bad_answer", "the broker's key listing did not move forward")
        self.keys += page
        if following is None:
            return False
        self._cursors.add(following)
        return True


def list_keys(filters: Mapping[str, str | None], limit: int, after: str | None) -> Call[KeyPage]:
    """One page of at most ``limit`` keys, names in order, after ``after`` (the ``next`` of the
    page before, an opaque cursor, or a key name)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidInput(0, "bad_request", "page_size must be an integer from 1 to 1000")
    params = {k: v for k, v in filters.items() if v is not None}
    params["limit"] = str(limit)
    if after is not None:
        params["after"] = after

    def parse(resp: Response) -> KeyPage:
        doc = resp.json()
        keys = list(_field(doc, "keys", list))
        following = doc.get("next") if isinstance(doc, dict) else None
        if following is None:
            return keys, None
        # The cursor is opaque (it never names a key the caller may not read), and one position
        # always gives the same cursor: one that comes back unchanged would page forever.
        if not isinstance(following, str) or not following or following == after:
            raise UnexpectedResponse(0, "bad_answer", "the broker's key listing did not move forward")
        return keys, following

    return Call("GET", "/v1/keys?" + urllib.parse.urlencode(params), parse, safe=True)


def get_key(name: str) -> Call[dict[str, Any]]:
    return Call("GET", f"/v1/keys/{seg(name, 'name')}", _dict, safe=True)


def update_key(name: str, changes: Mapping[str, Any]) -> Call[dict[str, Any]]:
    if not changes:
        raise InvalidInput(0, "bad_request", "nothing to change")
    return Call("PATCH", f"/v1/keys/{seg(name, 'name')}", _dict, dict(changes))


def lifecycle(
    name: str, action: str, body: Mapping[str, Any], idempotency_key: str | None
) -> Call[dict[str, Any]]:
    path = f"/v1/keys/{seg(name, 'name')}/{action}"
    return Call("POST", path, _dict, dict(body), idempotency_key=idempotency_key)


# -- grants, policies, bindings ----------------------------------------------------------


def create_grant(
    key: str,
    grantee: str,
    operations: Iterable[str],
    expires_in: int | str,
    context_equals: Mapping[str, str] | None,
    context_subset: Mapping[str, str] | None,
    idempotency_key: str | None,
) -> Call[dict[str, Any]]:
    body: dict[str, Any] = {"grantee": grantee, "operations": list(operations), "expires_in": expires_in}
    if context_equals is not None:
        body["context_equals"] = _context(context_equals)
    if context_subset is not None:
        body["context_subset"] = _context(context_subset)
    path = f"/v1/keys/{seg(key, 'key')}/grants"
    return Call("POST", path, _dict, body, idempotency_key=idempotency_key)


def list_grants(key: str) -> Call[list[dict[str, Any]]]:
    def parse(resp: Response) -> list[dict[str, Any]]:
        return list(_field(resp.json(), "grants", list))

    return Call("GET", f"/v1/keys/{seg(key, 'key')}/grants", parse, safe=True)


def revoke_grant(key: str, grant_id: str) -> Call[dict[str, Any]]:
    return Call("DELETE", f"/v1/keys/{seg(key, 'key')}/grants/{seg(grant_id, 'grant id')}", _dict)


def retire_grant(key: str, grant_id: str) -> Call[dict[str, Any]]:
    path = f"/v1/keys/{seg(key, 'key')}/grants/{seg(grant_id, 'grant id')}/retire"
    return Call("POST", path, _dict, {})


def get_policies() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/policies", _dict, safe=True)


def put_policies(
    document: Mapping[str, Any], version: int | None, idempotency_key: str | None
) -> Call[dict[str, Any]]:
    body: dict[str, Any] = {"document": dict(document)}
    if version is not None:
        body["version"] = version
    return Call("PUT", "/v1/policies", _dict, body, idempotency_key=idempotency_key)


def get_role(role: str) -> Call[dict[str, Any]]:
    return Call("GET", f"/v1/policies/{seg(role, 'role')}", _dict, safe=True)


def put_role(role: str, document: Mapping[str, Any]) -> Call[dict[str, Any]]:
    return Call("PUT", f"/v1/policies/{seg(role, 'role')}", _dict, dict(document))


def delete_role(role: str) -> Call[dict[str, Any]]:
    return Call("DELETE", f"/v1/policies/{seg(role, 'role')}", _dict)


def explain(
    principal: str, operation: str, key: str | None, context: Mapping[str, str] | None
) -> Call[dict[str, Any]]:
    body: dict[str, Any] = {"principal": principal, "operation": operation}
    if key is not None:
        body["key"] = key
    if context is not None:
        body["context"] = _context(context)
    return Call("POST", "/v1/policies/explain", _dict, body, True)


def get_bindings() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/bindings", _dict, safe=True)


def put_bindings(bindings: Mapping[str, Iterable[str]], version: int | None) -> Call[dict[str, Any]]:
    body: dict[str, Any] = {"bindings": {k: list(v) for k, v in bindings.items()}}
    if version is not None:
        body["version"] = version
    return Call("PUT", "/v1/bindings", _dict, body)


# -- health, metrics, audit ----------------------------------------------------------------


def health() -> Call[dict[str, Any]]:
    # A 503 health document is an answer (which part cannot serve), not an error to retry.
    return Call("GET", "/v1/sys/health", _dict, safe=True, ok=(503,))


def _text(resp: Response) -> str:
    return resp.body.decode("utf-8", errors="replace")


def metrics() -> Call[str]:
    return Call("GET", "/v1/metrics", _text, safe=True, headers={"Accept": "text/plain"})


def audit_verify() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/audit/verify", _dict, safe=True)


def audit_events(params: Mapping[str, str | int | None]) -> Call[dict[str, Any]]:
    query = urllib.parse.urlencode({k: str(v) for k, v in params.items() if v is not None})
    return Call("GET", "/v1/audit/events" + (f"?{query}" if query else ""), _dict, safe=True)


def audit_public_key() -> Call[str]:
    return Call("GET", "/v1/audit/public-key", _text, safe=True, headers={"Accept": "application/x-pem-file"})


def audit_hmac(value: str) -> Call[str]:
    return Call("POST", "/v1/audit/hmac", lambda r: _field(r.json(), "hmac", str), {"value": value}, True)


def audit_epoch(name: str, reason: str) -> Call[dict[str, Any]]:
    return Call("POST", "/v1/audit/epoch", _dict, {"name": name, "reason": reason})


# POSTs that change nothing but the audit log: sending one twice is harmless.
_SAFE_POST = re.compile(
    r"^/v1/keys/[^/?]+/(?:encrypt|decrypt|datakey|rewrap|sign|verify)$|^/v1/policies/explain$|^/v1/audit/hmac$"
)


# The changes the broker keeps an Idempotency-Key record for (broker/api/idempotency.py callers);
# on any other route it ignores the header, so a retry would make the change twice.
_KEYED_ROUTES = re.compile(
    r"^(?:POST /v1/keys|PATCH /v1/keys/[^/?]+|PUT /v1/policies|POST /v1/keys/[^/?]+/"
    r"(?:rotate|suspend|resume|revoke|schedule-destruction|cancel-destruction|grants))$"
)


def raw(
    method: str, path: str, body: Any, ok: tuple[int, ...], safe: bool | None, idempotency_key: str | None
) -> Call[Any]:
    """A call by method and path. Unless told, it is safe to retry when it is a read or a crypto
    operation (by its path), or carries an idempotency key (only where the broker honours one)."""
    verb = method.upper()
    if not path.startswith("/") or any(c in path for c in " \r\n\t"):
        raise InvalidInput(0, "bad_request", f"a path starts with '/' and has no spaces, got {path!r}")
    if idempotency_key is not None and not _KEYED_ROUTES.match(f"{verb} {path.split('?', 1)[0]}"):
        raise InvalidInput(
            0,
            "bad_request",
            f"the broker keeps no Idempotency-Key record for {verb} {path.split('?', 1)[0]}: "
            "a retry would make the change again; send it without one",
        )
    if safe is None:
        safe = verb in ("GET", "HEAD") or (
            verb == "POST" and _SAFE_POST.match(path.split("?", 1)[0]) is not None
        )
    return Call(verb, path, _json_body, body, safe, ok, idempotency_key)
