"""TLS contexts: the broker's server side (mTLS, TLS 1.2+) and the CLI's client side."""

from __future__ import annotations

import ssl
from pathlib import Path

from broker.config.model import ServerConfig
from broker.errors import ConfigError


def server_ssl_context(server: ServerConfig) -> ssl.SSLContext:
    """The one server context: TLS 1.2 minimum, a client certificate from the client CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Renegotiation lets a client restart the handshake mid-connection; nothing here needs it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    _load(ctx.load_cert_chain, "server.cert_file", server.cert_file, server.key_file)
    _load(ctx.load_verify_locations, "server.client_ca_file", server.client_ca_file)
    return ctx


def client_ssl_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A client context that verifies the broker against ``ca_file`` and presents a certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx.load_verify_locations, "ca_file", ca_file)
    _load(ctx.load_cert_chain, "cert_file/key_file", cert_file, key_file)
    return ctx


def _load(fn: object, key: str, *paths: Path) -> None:
    try:
        fn(*(str(p) for p in paths))  # type: ignore[operator]
    except FileNotFoundError:
        raise ConfigError(f"file not found: {', '.join(map(str, paths))}", key=key) from None
    except ssl.SSLError as exc:
        raise ConfigError(f"not usable as PEM certificate/key ({exc.reason})", key=key) from None
    except OSError as exc:
        # A directory, an unreadable file: the setting and the reason, never a traceback.
        named = ", ".join(map(str, paths))
        raise ConfigError(f"cannot read {named} ({exc.strerror or exc})", key=key) from None
