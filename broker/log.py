"""Structured JSON logs via structlog, with secrets redacted by field name.

Callers should never hand a secret to the logger in the first place; the
redaction processor is the second line, for the day someone does.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

REDACTED = "[redacted]"

# Field names that must never carry their value into a log line.
_SECRET_FIELD = re.compile(
    r"(token|secret|password|passwd|pin$|^pin|plaintext|key_material|data_?key|recovery|"
    r"private|credential|authorization|cookie)",
    re.IGNORECASE,
)


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: replace the value of any secret-named field, at any depth."""
    for key in list(event_dict):
        if key == "event":
            continue
        event_dict[key] = _redact(key, event_dict[key])
    return event_dict


@functools.lru_cache(maxsize=4096)
def _secret_name(key: str) -> bool:
    # Remembered per name: the broker logs a few dozen field names on every request, and the
    # search was most of a log line's cost. Bounded, so names from nested data cannot grow it.
    return _SECRET_FIELD.search(key) is not None


def _redact(key: str, value: Any) -> Any:
    if _secret_name(key):
        return REDACTED
    if isinstance(value, dict):
        return {k: _redact(str(k), v) for k, v in value.items()}
    return value


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the process: one JSON object per line on ``stream`` (stderr)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(logger_name=name)
    return logger
