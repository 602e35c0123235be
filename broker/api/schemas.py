"""Reading request bodies: JSON objects, base64 fields, contexts; every failure a clear 400."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from aiohttp import web

from broker.errors import BadRequest, PayloadTooLarge

MAX_PLAINTEXT = 4096
MAX_CONTEXT_FIELDS = 32
MAX_CONTEXT_KEY = 128
MAX_CONTEXT_VALUE = 1024
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


async def json_object(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def string(body: dict[str, Any], name: str, *, required: bool = False, default: str = "") -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required (a string)")
        return default
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string")
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
    return value


def b64(body: dict[str, Any], name: str, *, required: bool = True) -> bytes | None:
    """A base64 field (standard or URL-safe alphabet, padding optional)."""
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"'{name}' is required (base64)")
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a base64 string")
    text = value.strip().replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{name}' is not valid base64") from None


def plaintext(body: dict[str, Any]) -> bytes:
    data = b64(body, "plaintext")
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
        if not isinstance(v, str):
            raise BadRequest(f"context field '{k}' must be a string")
        if not k or len(k) > MAX_CONTEXT_KEY or len(v) > MAX_CONTEXT_VALUE:
            raise BadRequest(
                f"context keys are 1..{MAX_CONTEXT_KEY} characters and values at most {MAX_CONTEXT_VALUE}"
            )
    return dict(value)


def tags(body: dict[str, Any]) -> dict[str, str] | None:
    value = body.get("tags")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest("'tags' must be an object of string values")
    return dict(value)


def duration(body: dict[str, Any], name: str) -> int | None:
    """Seconds, from an integer or a string like ``90d``, ``12h``, ``3600s``; null clears."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        seconds = int(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise BadRequest(f"'{name}' must be seconds or a duration like '90d', '12h', '3600s'")
    if seconds <= 0:
        raise BadRequest(f"'{name}' must be positive")
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
