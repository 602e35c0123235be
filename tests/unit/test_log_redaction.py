"""Secrets handed to the logger by mistake are redacted by field name."""

from __future__ import annotations

import io
import json

import structlog

from broker.log import REDACTED, configure_logging, get_logger, redact_secrets


def test_redaction_at_any_depth() -> None:
    """Secret-named fields are replaced, nested ones too; other fields are kept."""
    event = {
        "event": "x",
        "client_token": "s.abc",
        "hsm_pin": "1234",
        "details": {"plaintext": "aGk=", "key": "payments"},
        "key": "payments",
    }

    out = redact_secrets(None, "info", event)

    assert out == {
        "event": "x",
        "client_token": REDACTED,
        "hsm_pin": REDACTED,
        "details": {"plaintext": REDACTED, "key": "payments"},
        "key": "payments",
    }


def test_configured_logger_writes_json_without_secrets() -> None:
    """The process logger renders one JSON object per line with redaction applied."""
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    try:
        get_logger("t").info("login", token="s.SECRETVALUE", ttl=60)
    finally:
        structlog.reset_defaults()

    line = json.loads(stream.getvalue().strip())
    assert line["token"] == REDACTED
    assert line["ttl"] == 60
    assert "SECRETVALUE" not in stream.getvalue()
