"""Reading request bodies: JSON objects, base64 fields, contexts; every failure a clear 400.

Every body is checked whole before any handler sees it (README "Input limits"): UTF-8,
at most :data:`MAX_JSON_DEPTH` levels of nesting (measured without recursing, so a
100,000-deep ``[[[…`` costs one linear scan), no duplicate member names, no
``NaN``/``Infinity``, and every string (member names included) made of Unicode scalar
values only: ``json.loads`` turns ``"\\ud800"`` into a lone surrogate that no encoder
can write (the audit log among them).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from aiohttp import web

from broker.errors import BadRequest, PayloadTooLarge
from broker.printable import unprintable_reason
from broker.timeutil import duration_seconds

MAX_JSON_DEPTH = 32
MAX_PLAINTEXT = 4096
MAX_CONTEXT_FIELDS = 32
MAX_CONTEXT_KEY = 128
MAX_CONTEXT_VALUE = 1024
MAX_TAGS = 32
MAX_TAG_KEY = 128
MAX_TAG_VALUE = 256
MAX_DESCRIPTION = 1024
# Integers in bodies stay within what every JSON implementation reads exactly (2^53 - 1).
MAX_INTEGER = 2**53 - 1
# A JSON string literal, unrolled so matching is linear; brackets inside strings do not nest.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")
# Base64 in one alphabet (standard or URL-safe, not mixed), padding optional.
_B64_STANDARD = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_B64_URLSAFE = re.compile(r"[A-Za-z0-9_-]*={0,2}")


class InvalidText(BadRequest):
    """A string that is not a sequence of Unicode scalar values (a lone surrogate)."""

    code = "invalid_text"
    title = "Text is not valid Unicode"


class JsonTooDeep(BadRequest):
    code = "json_too_deep"
    title = "JSON nested too deeply"


def scalar_text(value: str, where: str) -> str:
    """``value`` if it encodes as UTF-8 (no lone surrogate), else :class:`InvalidText`."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidText(
            f"{where} holds a lone UTF-16 surrogate, which is not a Unicode character"
        ) from None
    return value


def json_depth(text: str, limit: int) -> int:
    """The nesting depth of the JSON ``text`` (exact for valid JSON); stops counting past ``limit``."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_JSON_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        # Two parsers could each take a different one of the two values: refuse both.
        raise ValueError("duplicate member name")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_strings(document: Any) -> None:
    """Every string in the (depth-bounded) document, member names too, must be scalar values."""
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            scalar_text(value, "a string in the body")
        elif isinstance(value, dict):
            for k, v in value.items():
                scalar_text(k, "a member name in the body")
                pending.append(v)
        elif isinstance(value, list):
            pending.extend(value)


def parse_json(raw: bytes) -> Any:
    """Parse a request body under the rules in the module docstring; any breach is a 400."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8") from None
    if json_depth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise JsonTooDeep(f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and our hooks; the message names no body content.
        reason = str(exc) if not isinstance(exc, json.JSONDecodeError) else exc.msg
        raise BadRequest(f"the body is not valid JSON ({reason})") from None
    _check_strings(document)
    return document


class ClientDisconnected(BadRequest):
    """The client closed the connection before its body was complete: its request failed, not the
    broker (never an internal error with a traceback; nobody is left to read the answer)."""

    code = "client_disconnected"
    title = "Client closed the connection"


async def json_object(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        raw = await request.read()
    except ConnectionResetError:
        raise ClientDisconnected("the connection closed before the request body was complete") from None
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def string(
    body: dict[str, Any],
    name: str,
    *,
    required: bool = False,
    default: str = "",
    max_length: int | None = None,
) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required (a string)")
        return default
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string")
    if max_length is not None and len(value) > max_length:
        raise BadRequest(f"'{name}' may be at most {max_length} characters")
    return scalar_text(value, f"'{name}'")


def text(body: dict[str, Any], name: str, *, max_length: int) -> str:
    """A stored, human-read string (a key description): printable text only, like tag values.

    Whoever shows it later (``keybroker keys show``, a log viewer) must not be made to
    run the terminal control sequences it could otherwise carry.
    """
    value = string(body, name, max_length=max_length)
    reason = unprintable_reason(value, f"'{name}'")
    if reason is not None:
        raise BadRequest(reason)
    return value


def boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false")
    return value


def integer(body: dict[str, Any], name: str, *, required: bool = False) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required (an integer)")
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"'{name}' must be an integer")
    if not -MAX_INTEGER <= value <= MAX_INTEGER:
        raise BadRequest(f"'{name}' is out of range")
    return value


def b64(
    body: dict[str, Any], name: str, *, required: bool = True, max_bytes: int | None = None
) -> bytes | None:
    """A base64 field: standard or URL-safe alphabet (one of them), padding optional, no whitespace.

    Within the spelling the caller chose there is exactly one valid string per byte
    sequence: unused trailing bits must be zero and padding, if any, complete.
    """
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required (base64)")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a base64 string")
    if max_bytes is not None and len(value) > 4 * (max_bytes // 3 + 1):
        raise PayloadTooLarge(f"'{name}' is over the limit of {max_bytes} bytes")
    urlsafe = _B64_URLSAFE.fullmatch(value) is not None and ("-" in value or "_" in value)
    if not urlsafe and _B64_STANDARD.fullmatch(value) is None:
        raise BadRequest(f"'{name}' is not valid base64")
    unpadded = value.rstrip("=")
    try:
        data = base64.b64decode(
            unpadded + "=" * (-len(unpadded) % 4), altchars=b"-_" if urlsafe else None, validate=True
        )
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{name}' is not valid base64") from None
    again = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data).decode()
    if value not in (again, again.rstrip("=")):
        raise BadRequest(f"'{name}' is not valid base64 (not its canonical spelling)")
    return data


def plaintext(body: dict[str, Any]) -> bytes:
    data = b64(body, "plaintext", max_bytes=MAX_PLAINTEXT)
    assert data is not None  # noqa: S101 - required=True never returns None
    if len(data) > MAX_PLAINTEXT:
        raise PayloadTooLarge(
            f"plaintext is {len(data)} bytes; the limit is {MAX_PLAINTEXT}. For larger data use "
            "envelope encryption: POST /v1/keys/{name}/datakey, encrypt locally with the data key, "
            "store its ciphertext beside the data"
        )
    return data


def context(body: dict[str, Any]) -> dict[str, str]:
    """The encryption context: a flat map of strings, bounded in size."""
    value = body.get("context")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest("'context' must be an object of string values")
    if len(value) > MAX_CONTEXT_FIELDS:
        raise BadRequest(f"'context' may have at most {MAX_CONTEXT_FIELDS} fields")
    for k, v in value.items():
        # Checked here too: a context can be built from something other than a parsed body.
        scalar_text(k, "a context field name")
        if not isinstance(v, str):
            raise BadRequest("context values must be strings")
        scalar_text(v, "a context value")
        if not k or len(k) > MAX_CONTEXT_KEY or len(v) > MAX_CONTEXT_VALUE:
            raise BadRequest(
                f"context keys are 1..{MAX_CONTEXT_KEY} characters and values at most {MAX_CONTEXT_VALUE}"
            )
    return dict(value)


def tags(body: dict[str, Any]) -> dict[str, str] | None:
    """Key tags: at most :data:`MAX_TAGS`; names printable, without '=' (``?tag=name=value``)."""
    value = body.get("tags")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest("'tags' must be an object of string values")
    if len(value) > MAX_TAGS:
        raise BadRequest(f"'tags' may have at most {MAX_TAGS} entries")
    for k, v in value.items():
        scalar_text(k, "a tag name")
        scalar_text(v, "a tag value")
        if not (0 < len(k) <= MAX_TAG_KEY and k.isprintable() and "=" not in k):
            raise BadRequest(f"tag names are 1..{MAX_TAG_KEY} printable characters without '='")
        if len(v) > MAX_TAG_VALUE or not v.isprintable():
            raise BadRequest(f"tag values are at most {MAX_TAG_VALUE} printable characters")
    return dict(value)


def duration(body: dict[str, Any], name: str) -> int | None:
    """Seconds, from an integer or a string like ``90d``, ``12h``, ``3600s``; null clears."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        seconds: int | None = value
    else:
        seconds = duration_seconds(value) if isinstance(value, str) else None
    if seconds is None:
        raise BadRequest(f"'{name}' must be seconds or a duration like '90d', '12h', '3600s'")
    if not 0 < seconds <= MAX_INTEGER:
        raise BadRequest(f"'{name}' must be positive (and below 2^53 seconds)")
    return seconds


def batch_items(body: dict[str, Any], limit: int) -> list[dict[str, Any]] | None:
    value = body.get("batch")
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(i, dict) for i in value):
        raise BadRequest("'batch' must be a non-empty list of objects")
    if len(value) > limit:
        raise PayloadTooLarge(f"a batch may carry at most {limit} items, this one has {len(value)}")
    return value
