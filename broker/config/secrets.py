"""Secrets named in configuration (AppRole ids, the HSM PIN, the audit HMAC key), read from files."""

from __future__ import annotations

from pathlib import Path

from broker.errors import ConfigError


def read_secret_file(path: Path, key: str) -> str:
    """Read a one-line secret from a file named in config; the value is never logged."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"file not found: {path}", key=key) from None
    except PermissionError:
        raise ConfigError(f"permission denied reading {path}", key=key) from None
    if not value:
        raise ConfigError(f"file is empty: {path}", key=key)
    return value
