"""Load a TOML config file into :class:`broker.config.model.Config`.

Every value is checked against the model's types; an error names the file, the
dotted key and what was expected. ``KEYBROKER__SECTION__KEY`` environment
variables override file values (``KEYBROKER__SERVER__PORT=9443``). Relative paths
are taken relative to the config file's directory.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker.config.model import GCM_IV_MODES, Config
from broker.errors import ConfigError

ENV_PREFIX = "KEYBROKER__"

# Keys that would put a secret into the config file: refused with a pointer to the safe way.
_SECRET_KEYS = {
    "hsm.pin": "put the HSM PIN in a file (hsm.pin_file) or an environment variable (hsm.pin_env)",
    "vault.token": "the broker logs in with AppRole (vault.role_id_file, vault.secret_id_file)",
    "vault.secret_id": "name the file holding it with vault.secret_id_file",
    "vault.role_id": "name the file holding it with vault.role_id_file",
    "kms.secret_access_key": "use the standard AWS credential chain (environment, profile, role)",
}

_LEVELS = {"debug", "info", "warning", "error"}


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, and validate; raise ConfigError on any problem."""
    path = Path(path)
    source = str(path)
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("file not found", source=source) from None
    except PermissionError:
        raise ConfigError("permission denied reading the file", source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML ({exc})", source=source) from None
    env = os.environ if environ is None else environ
    _apply_env_overrides(raw, env)
    built: Config = _build(Config, raw, prefix="", source=source, base=path.parent.resolve())
    config = dataclasses.replace(built, source=source)
    _check_semantics(config)
    return config


def _apply_env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if len(parts) != 2:
            raise ConfigError(
                "expected KEYBROKER__<SECTION>__<KEY>, e.g. KEYBROKER__SERVER__PORT",
                source="environment",
                key=name,
            )
        section = raw.setdefault(parts[0], {})
        if not isinstance(section, dict):
            raise ConfigError("is not a table in the file", source="environment", key=name)
        section[parts[1]] = _EnvValue(value)


class _EnvValue(str):
    """A string from the environment: converted to the field's type, unlike file values."""


def _build(cls: type[Any], raw: Any, *, prefix: str, source: str, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError("expected a table", source=source, key=prefix.rstrip(".") or "<root>")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in raw:
        dotted = prefix + key
        if dotted in _SECRET_KEYS:
            raise ConfigError(
                f"secrets are not accepted in the config file; {_SECRET_KEYS[dotted]}",
                source=source,
                key=dotted,
            )
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key (known here: {known})", source=source, key=dotted)
    values: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = prefix + name
        if name not in raw:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if not no_default:
                continue
            if dataclasses.is_dataclass(hints[name]):
                raise ConfigError("missing table", source=source, key=dotted)
            raise ConfigError(f"missing (expected {_describe(hints[name])})", source=source, key=dotted)
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name], prefix=dotted + ".", source=source, base=base)
        else:
            values[name] = _convert(raw[name], hint, key=dotted, source=source, base=base)
    return cls(**values)


def _describe(hint: Any) -> str:
    if _is_optional(hint):
        return _describe(_non_none(hint)) + " or nothing"
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        Path: "a file path",
        tuple[str, ...]: "a list of strings",
    }.get(hint, str(hint))


def _is_optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def _non_none(hint: Any) -> Any:
    return next(a for a in typing.get_args(hint) if a is not type(None))


def _convert(value: Any, hint: Any, *, key: str, source: str, base: Path) -> Any:
    if _is_optional(hint):
        if value in ("", None):
            return None
        hint = _non_none(hint)
    from_env = isinstance(value, _EnvValue)
    try:
        converted = _CONVERTERS[hint](value, from_env, base)
    except ValueError:
        converted = _INVALID
    if converted is _INVALID:
        raise ConfigError(
            f"expected {_describe(hint)}, got {value!r}",
            source="environment" if from_env else source,
            key=key,
        )
    return converted


_INVALID = object()
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _to_bool(value: Any, from_env: bool, base: Path) -> Any:
    if from_env and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    return value if isinstance(value, bool) else _INVALID


def _to_int(value: Any, from_env: bool, base: Path) -> Any:
    if from_env:
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID


def _to_float(value: Any, from_env: bool, base: Path) -> Any:
    if from_env:
        return float(value)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else _INVALID


def _to_str(value: Any, from_env: bool, base: Path) -> Any:
    return str(value) if isinstance(value, str) else _INVALID


def _to_path(value: Any, from_env: bool, base: Path) -> Any:
    if not isinstance(value, str) or not value:
        return _INVALID
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _to_strings(value: Any, from_env: bool, base: Path) -> Any:
    if from_env:  # comma-separated in the environment
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return _INVALID


_CONVERTERS: dict[Any, Any] = {
    bool: _to_bool,
    int: _to_int,
    float: _to_float,
    str: _to_str,
    Path: _to_path,
    tuple[str, ...]: _to_strings,
}


def _check_semantics(config: Config) -> None:
    src = config.source
    if not 0 < config.server.port < 65536:
        raise ConfigError("expected a TCP port 1..65535", source=src, key="server.port")
    for url in config.vault.nodes:
        _check_transport_url(url, config.vault.allow_insecure_http, src, "vault")
    if config.vault.deadline_seconds < config.vault.timeout_seconds:
        raise ConfigError(
            "expected at least vault.timeout_seconds (one attempt must fit in the deadline)",
            source=src,
            key="vault.deadline_seconds",
        )
    if config.kms.deadline_seconds < config.kms.timeout_seconds:
        raise ConfigError(
            "expected at least kms.timeout_seconds (one attempt must fit in the deadline)",
            source=src,
            key="kms.deadline_seconds",
        )
    if config.kms.endpoint:
        _check_transport_url(config.kms.endpoint, config.kms.allow_insecure_http, src, "kms")
    _check_server_limits(config)
    if not 0.1 <= config.vault.renew_fraction <= 0.9:
        raise ConfigError("expected a fraction between 0.1 and 0.9", source=src, key="vault.renew_fraction")
    hsm = config.hsm
    if (hsm.pin_file is None) == (not hsm.pin_env):
        raise ConfigError("name exactly one of hsm.pin_file or hsm.pin_env", source=src, key="hsm.pin_file")
    if hsm.sessions < 1:
        raise ConfigError("expected at least 1", source=src, key="hsm.sessions")
    if hsm.gcm_iv not in GCM_IV_MODES:
        raise ConfigError(f"expected one of {list(GCM_IV_MODES)}", source=src, key="hsm.gcm_iv")
    if config.log.level.lower() not in _LEVELS:
        raise ConfigError(f"expected one of {sorted(_LEVELS)}", source=src, key="log.level")
    if config.policy.max_stale_seconds < 2 * config.policy.refresh_seconds:
        raise ConfigError(
            "expected at least twice policy.refresh_seconds, or one slow Vault read stops the broker",
            source=src,
            key="policy.max_stale_seconds",
        )
    if not 0 <= config.keys.cache_seconds <= 60:
        raise ConfigError("expected 0 (no cache) to 60 seconds", source=src, key="keys.cache_seconds")
    if config.keys.max_batch_items < 1:
        raise ConfigError("expected at least 1", source=src, key="keys.max_batch_items")
    if config.keys.scheduler_claim_seconds < 60:
        # Shorter than a slow backend call (timeouts and retries) would let a second replica
        # take over work that is still running: two rotations in one period.
        raise ConfigError("expected at least 60 seconds", source=src, key="keys.scheduler_claim_seconds")
    if not 60 <= config.keys.idempotency_ttl_seconds <= 30 * 86400:
        # Shorter than a client's retry window would let a late retry do the change twice.
        raise ConfigError("expected 60 seconds to 30 days", source=src, key="keys.idempotency_ttl_seconds")
    if not 1 <= config.kms.max_attempts <= 10:
        raise ConfigError(
            "expected 1 to 10 attempts in all (the first included)", source=src, key="kms.max_attempts"
        )
    for key in (
        "vault.timeout_seconds",
        "vault.node_retry_seconds",
        "kms.timeout_seconds",
        "hsm.timeout_seconds",
        "keys.scheduler_interval_seconds",
        "policy.refresh_seconds",
    ):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) <= 0:
            raise ConfigError("expected a positive number of seconds", source=src, key=key)


def _check_transport_url(url: str, allow_http: bool, src: str, section: str) -> None:
    """https:// only: a plain-http backend would carry secrets and plaintexts in the clear."""
    key = "vault.address" if section == "vault" else "kms.endpoint"
    if url.startswith("https://"):
        return
    if not url.startswith("http://"):
        raise ConfigError(f"expected an https:// URL, got {url!r}", source=src, key=key)
    if not allow_http:
        raise ConfigError(
            f"refusing plain http ({url!r}): it would carry credentials and plaintexts unencrypted; "
            f"use https://, or set {section}.allow_insecure_http = true for a local development stand-in",
            source=src,
            key=key,
        )


# (key, smallest allowed, largest allowed): outside these the broker either refuses ordinary
# requests or stops bounding what one client may hold.
_SERVER_LIMITS = (
    ("max_body_bytes", 1024, 64 * 1024 * 1024),
    ("max_request_line_bytes", 256, 65536),
    ("max_header_bytes", 256, 65536),
    ("max_headers", 8, 256),
    ("max_connections", 1, 1_000_000),
    ("idle_timeout_seconds", 0.1, 3600),
    ("header_timeout_seconds", 0.1, 600),
    ("body_timeout_seconds", 0.1, 600),
    ("tls_handshake_timeout_seconds", 0.1, 600),
    ("max_handshakes", 1, 100_000),
    ("max_handshakes_per_peer", 1, 100_000),
    ("crl_refresh_seconds", 1, 3600),
    ("crl_max_age_seconds", 2, 86400),
)


def _check_server_limits(config: Config) -> None:
    server = config.server
    for name, low, high in _SERVER_LIMITS:
        value = getattr(server, name)
        if not low <= value <= high:
            raise ConfigError(
                f"expected {low} to {high}, got {value}", source=config.source, key=f"server.{name}"
            )
    if server.max_handshakes_per_peer > server.max_handshakes:
        raise ConfigError(
            "expected at most server.max_handshakes",
            source=config.source,
            key="server.max_handshakes_per_peer",
        )
    if server.crl_max_age_seconds < 2 * server.crl_refresh_seconds:
        raise ConfigError(
            "expected at least twice server.crl_refresh_seconds, or one slow Vault read stops the broker",
            source=config.source,
            key="server.crl_max_age_seconds",
        )
