"""What every ``keybroker`` subcommand shares: one command signature, the broker connection
(opened on first use, so offline commands never need certificates), the connection options
and the argument types several command groups use.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker.cli.client import BrokerClient
from broker.errors import ConfigError
from broker.keys.model import NAME_RE, NAME_RULE

EXIT_FAILED = 1
EXIT_USAGE = 2

# Connection settings: (namespace attribute, flag, environment variable, what the file is).
_SETTINGS = (
    ("addr", "--addr", "KEYBROKER_ADDR", "the broker address"),
    ("ca_cert", "--ca-cert", "KEYBROKER_CACERT", "the broker's CA"),
    ("client_cert", "--client-cert", "KEYBROKER_CLIENT_CERT", "your certificate"),
    ("client_key", "--client-key", "KEYBROKER_CLIENT_KEY", "your private key"),
)


class Session:
    """The running broker a command talks to, connected on the first call of :meth:`client`.

    Every subcommand receives one; commands that work offline (``serve``, ``dev``,
    ``audit merge``, ``audit verify --dir``) simply never ask it for a client.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self._client: BrokerClient | None = None

    def client(self) -> BrokerClient:
        if self._client is None:
            address, context = client_context(self._args)
            self._client = BrokerClient(address, context)
        return self._client


# The one signature of every subcommand: its parsed arguments and the session; returns the exit status.
Command = Callable[[argparse.Namespace, Session], int]


def client_context(args: argparse.Namespace) -> tuple[str, ssl.SSLContext]:
    """The broker address and a client TLS context from the flags or the KEYBROKER_* variables."""
    from broker.config.tls import client_ssl_context

    # Each value with where it came from (the flag or the variable), to name in errors.
    found: dict[str, tuple[str, str]] = {}
    missing = []
    for attr, flag, env, _ in _SETTINGS:
        if getattr(args, attr, None):
            found[attr] = (str(getattr(args, attr)), flag)
        elif os.environ.get(env):
            found[attr] = (os.environ[env], env)
        else:
            missing.append(f"{flag}/{env}")
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (after `keybroker dev`, source its env file)")
    addr, addr_source = found["addr"]
    # `keybroker dev --ha` lists every replica, comma-separated; this client talks to the first.
    addr = addr.split(",", 1)[0].strip()
    if not addr.startswith("https://"):
        raise ConfigError(f"the broker address must be https://, got {addr!r} (from {addr_source})")
    # Each file is opened on its own first, so an error names the file and the setting it came from.
    for attr, _, _, what in _SETTINGS[1:]:
        path, source = found[attr]
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            reason = exc.strerror or exc.__class__.__name__
            raise ConfigError(f"cannot read {what} {path} (from {source}): {reason}") from None
    (ca, ca_from), (cert, cert_from), (key, key_from) = (found[a] for a, *_ in _SETTINGS[1:])
    try:
        return addr.rstrip("/"), client_ssl_context(Path(ca), Path(cert), Path(key))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"cannot use the CA {ca} (from {ca_from}) with the certificate {cert} (from {cert_from}) "
            f"and key {key} (from {key_from}): {exc.reason or exc}"
        ) from None


def connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", help="broker URL (default: $KEYBROKER_ADDR)")
    p.add_argument("--ca-cert", help="CA that signed the broker's certificate (default: $KEYBROKER_CACERT)")
    p.add_argument("--client-cert", help="your certificate (default: $KEYBROKER_CLIENT_CERT)")
    p.add_argument("--client-key", help="your private key (default: $KEYBROKER_CLIENT_KEY)")


def add_command(
    parent: Any,
    name: str,
    help_: str,
    fn: Command,
    *,
    online: bool = True,
    json_output: bool = True,
    description: str | None = None,
    **parser_options: Any,
) -> argparse.ArgumentParser:
    """Register one subcommand: its help, connection options if it talks to a broker, --json, its function."""
    p: argparse.ArgumentParser = parent.add_parser(
        name,
        help=help_,
        description=description if description is not None else help_[0].upper() + help_[1:] + ".",
        **parser_options,
    )
    if online:
        connection_args(p)
    if json_output:
        p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(func=fn)
    return p


def add_group(sub: Any, name: str, help_: str, description: str, epilog: str) -> Any:
    """A command group (``keys``, ``policy``, ...) whose subcommands are added to the returned object."""
    parser = sub.add_parser(
        name,
        help=help_,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"keybroker: error: {message}", file=sys.stderr)
    return code


def quote(segment: str) -> str:
    """One URL path segment, every reserved character encoded."""
    return urllib.parse.quote(segment, safe="")


def key_name_arg(value: str) -> str:
    """argparse type: a key name by the broker's one name rule, refused before any request."""
    if NAME_RE.fullmatch(value) is None:
        raise argparse.ArgumentTypeError(f"not a key name: {value!r} (a name is {NAME_RULE})")
    return value


def context_pairs(pairs: Sequence[str] | None, flag: str = "--context") -> dict[str, str]:
    """Repeated KEY=VALUE options as a mapping (encryption contexts, tags)."""
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def create_private(path: str, data: bytes, flag: str) -> None:
    """Write a secret to a new file, mode 0600 from the start; never replace or follow a symlink."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise ConfigError(f"{flag}: {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigError(f"{flag}: {exc.strerror}: {path}") from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)  # whatever the umask left
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
