"""``keybroker keys ...``: the whole key lifecycle against a running broker, over mTLS.

Tables for people, ``--json`` for tools. Binary data crosses the command line as
files or standard input/output, never as an argument that would land in shell history.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from broker.client import BrokerClient
from broker.errors import ConfigError
from broker.keys.model import NAME_RE, NAME_RULE

Connect = Callable[[argparse.Namespace], BrokerClient]
ClientCommand = Callable[[argparse.Namespace, BrokerClient], int]

EPILOG = """\
examples (after `keybroker dev`, in another shell: . .keybroker/dev/env):
  keybroker keys create payments --backend vault --environment prod --rotation-period 90d
  keybroker keys list --backend hsm
  echo -n 'card 4111' | keybroker keys encrypt payments --context tenant=acme > card.kb
  keybroker keys decrypt payments --context tenant=acme < card.kb
  keybroker keys rotate payments
  keybroker keys rewrap payments --context tenant=acme < card.kb
  keybroker keys update payments --deletion-protection off
  keybroker keys schedule-destruction payments --pending-days 7
"""


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def key_name_arg(value: str) -> str:
    """argparse type: a key name by the broker's one name rule, refused before any request."""
    if NAME_RE.fullmatch(value) is None:
        raise argparse.ArgumentTypeError(f"not a key name: {value!r} (a name is {NAME_RULE})")
    return value


def _context(pairs: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--context takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _read_input(args: argparse.Namespace) -> bytes:
    if getattr(args, "input", None):
        try:
            return Path(args.input).read_bytes()
        except OSError as exc:
            raise ConfigError(f"--in: {exc.strerror}: {args.input}") from None
    if sys.stdin.isatty():
        raise ConfigError("give the data on standard input or with --in FILE")
    return sys.stdin.buffer.read()


def _read_text_input(args: argparse.Namespace, field: str) -> str:
    value = getattr(args, field, None)
    if value:
        return str(value)
    return _read_input(args).decode().strip()


def _write_output(args: argparse.Namespace, data: bytes) -> None:
    if getattr(args, "out", None):
        try:
            Path(args.out).write_bytes(data)
        except OSError as exc:
            raise ConfigError(f"--out: {exc.strerror}: {args.out}") from None
        return
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


# -- rendering ----------------------------------------------------------------------------

_COLUMNS = ("name", "backend", "type", "environment", "state", "latest_version", "rotation_period_seconds")
_HEADERS = ("NAME", "BACKEND", "TYPE", "ENV", "STATE", "VERSION", "ROTATION")


def _period(seconds: Any) -> str:
    if not seconds:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    return (
        f"{days}d" if not rest else f"{int(seconds) // 3600}h" if not int(seconds) % 3600 else f"{seconds}s"
    )


def _cell(key: dict[str, Any], column: str) -> str:
    value = key.get(column)
    if column == "rotation_period_seconds":
        return _period(value)
    return "-" if value is None else str(value)


def print_table(keys: list[dict[str, Any]]) -> None:
    rows = [_HEADERS, *[tuple(_cell(k, c) for c in _COLUMNS) for k in keys]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADERS))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not keys:
        print("(no keys)")


def print_key(key: dict[str, Any]) -> None:
    fields = [
        ("name", key["name"]),
        ("backend", key["backend"]),
        ("type", key["type"]),
        ("environment", key["environment"]),
        ("state", key["state"]),
        ("latest version", key.get("latest_version")),
        ("min decrypt version", key.get("min_decrypt_version")),
        ("rotation period", _period(key.get("rotation_period_seconds"))),
        ("deletion protection", "on" if key.get("deletion_protection") else "off"),
        ("owner", key.get("owner") or "-"),
        ("description", key.get("description") or "-"),
        ("tags", ", ".join(f"{k}={v}" for k, v in (key.get("tags") or {}).items()) or "-"),
        ("created", key.get("created_at")),
        ("last rotated", key.get("last_rotated_at") or "-"),
    ]
    if key.get("destroy_after"):
        fields.append(("destroy after", key["destroy_after"]))
    if key.get("revoked_reason"):
        fields.append(("revoked", key["revoked_reason"]))
    width = max(len(label) for label, _ in fields)
    for label, value in fields:
        print(f"{label.ljust(width)}  {value}")
    print("versions:")
    for v in key.get("versions", []):
        print(f"  v{v['version']}  created {v['created_at']}")


def _show(args: argparse.Namespace, key: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(key, indent=2))
    else:
        print_key(key)
    return 0


# -- commands -----------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace, client: BrokerClient) -> int:
    body: dict[str, Any] = {
        "name": args.name,
        "backend": args.backend,
        "type": args.type,
        "environment": args.environment,
        "deletion_protection": not args.no_deletion_protection,
    }
    if args.rotation_period:
        body["rotation_period"] = args.rotation_period
    if args.description:
        body["description"] = args.description
    if args.tag:
        body["tags"] = _context(args.tag)
    return _show(args, client.call("POST", "/v1/keys", body))


def cmd_list(args: argparse.Namespace, client: BrokerClient) -> int:
    query = {k: v for k in ("backend", "state", "environment", "tag") if (v := getattr(args, k))}
    suffix = "?" + urllib.parse.urlencode(query) if query else ""
    keys = client.call("GET", "/v1/keys" + suffix)["keys"]
    if args.json:
        print(json.dumps(keys, indent=2))
    else:
        print_table(keys)
    return 0


def cmd_show(args: argparse.Namespace, client: BrokerClient) -> int:
    return _show(args, client.call("GET", f"/v1/keys/{_quote(args.name)}"))


def cmd_update(args: argparse.Namespace, client: BrokerClient) -> int:
    body: dict[str, Any] = {}
    if args.rotation_period is not None:
        body["rotation_period"] = None if args.rotation_period == "none" else args.rotation_period
    if args.deletion_protection is not None:
        body["deletion_protection"] = args.deletion_protection == "on"
    if args.min_decrypt_version is not None:
        body["min_decrypt_version"] = args.min_decrypt_version
    if args.description is not None:
        body["description"] = args.description
    if not body:
        raise ConfigError("nothing to change: give at least one option (see --help)")
    return _show(args, client.call("PATCH", f"/v1/keys/{_quote(args.name)}", body))


def _action(action: str) -> Callable[[argparse.Namespace, BrokerClient], int]:
    def run(args: argparse.Namespace, client: BrokerClient) -> int:
        body: dict[str, Any] = {}
        if action == "revoke":
            body["reason"] = args.reason
        if action == "schedule-destruction":
            body["pending_days"] = args.pending_days
        return _show(args, client.call("POST", f"/v1/keys/{_quote(args.name)}/{action}", body))

    return run


def cmd_encrypt(args: argparse.Namespace, client: BrokerClient) -> int:
    data = _read_input(args)
    body = {"plaintext": base64.b64encode(data).decode(), "context": _context(args.context)}
    out = client.call("POST", f"/v1/keys/{_quote(args.name)}/encrypt", body)
    print(json.dumps(out) if args.json else out["ciphertext"])
    return 0


def cmd_decrypt(args: argparse.Namespace, client: BrokerClient) -> int:
    body = {"ciphertext": _read_text_input(args, "ciphertext"), "context": _context(args.context)}
    out = client.call("POST", f"/v1/keys/{_quote(args.name)}/decrypt", body)
    if args.json:
        print(json.dumps(out))
    else:
        _write_output(args, base64.b64decode(out["plaintext"]))
    return 0


def cmd_rewrap(args: argparse.Namespace, client: BrokerClient) -> int:
    body: dict[str, Any] = {
        "ciphertext": _read_text_input(args, "ciphertext"),
        "context": _context(args.context),
    }
    if args.to_key:
        body["to_key"] = args.to_key
    out = client.call("POST", f"/v1/keys/{_quote(args.name)}/rewrap", body)
    print(json.dumps(out) if args.json else out["ciphertext"])
    return 0


def cmd_datakey(args: argparse.Namespace, client: BrokerClient) -> int:
    body = {"bytes": args.bytes, "context": _context(args.context), "include_plaintext": args.with_plaintext}
    out = client.call("POST", f"/v1/keys/{_quote(args.name)}/datakey", body)
    print(json.dumps(out) if args.json else out["ciphertext"])
    return 0


# -- parser -------------------------------------------------------------------------------


def add_keys_parser(sub: Any, client_args: Callable[[argparse.ArgumentParser], None]) -> None:
    keys = sub.add_parser(
        "keys",
        help="create, rotate, suspend, revoke, destroy keys; encrypt and decrypt",
        description="Manage keys on a running broker over mTLS (address and certificates from "
        "--addr/--ca-cert/--client-cert/--client-key or the KEYBROKER_* variables that "
        "`keybroker dev` writes to its env file).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ksub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)

    def command(name: str, help_: str, fn: ClientCommand) -> Any:
        return client_command(ksub, name, help_, fn, client_args)

    p = command("create", "create a key (version 1 is generated in the backend)", cmd_create)
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--backend", required=True, choices=["vault", "kms", "hsm"])
    p.add_argument("--type", default="aes256-gcm", choices=["aes256-gcm", "ecdsa-p256"])
    p.add_argument("--environment", required=True, choices=["dev", "staging", "prod"])
    p.add_argument("--rotation-period", metavar="DURATION", help="e.g. 90d, 12h (at least 1h)")
    p.add_argument("--description")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="repeatable")
    p.add_argument(
        "--no-deletion-protection",
        action="store_true",
        help="allow scheduling destruction without first turning protection off",
    )

    p = command("list", "list keys, optionally filtered", cmd_list)
    p.add_argument("--backend", choices=["vault", "kms", "hsm"])
    p.add_argument("--state")
    p.add_argument("--environment", choices=["dev", "staging", "prod"])
    p.add_argument("--tag", metavar="KEY[=VALUE]")

    p = command("show", "show a key's metadata and versions", cmd_show)
    p.add_argument("name", type=key_name_arg)

    p = command("update", "change rotation period, deletion protection, min decrypt version", cmd_update)
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--rotation-period", metavar="DURATION", help="e.g. 90d; 'none' turns it off")
    p.add_argument("--deletion-protection", choices=["on", "off"])
    p.add_argument("--min-decrypt-version", type=int, metavar="N", help="versions below N stop decrypting")
    p.add_argument("--description")

    for action, help_ in (
        ("rotate", "add a new version; new encryptions use it, old ciphertexts still decrypt"),
        ("suspend", "stop all use of a key until it is resumed"),
        ("resume", "make a suspended key usable again"),
        ("cancel-destruction", "stop a scheduled destruction (the key comes back suspended)"),
    ):
        command(action, help_, _action(action)).add_argument("name", type=key_name_arg)
    p = command("revoke", "retire a key (decrypt only) or mark it compromised (no use)", _action("revoke"))
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--reason", required=True, choices=["retired", "compromised"])
    p = command(
        "schedule-destruction",
        "destroy a key's material after a waiting period (refused under deletion protection)",
        _action("schedule-destruction"),
    )
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--pending-days", type=int, default=30, help="7..30 (default: %(default)s)")

    p = command("encrypt", "encrypt standard input (or --in FILE); prints the ciphertext", cmd_encrypt)
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--in", dest="input", metavar="FILE", help="read the plaintext from FILE (max 4096 bytes)")
    p.add_argument("--context", action="append", metavar="KEY=VALUE", help="encryption context (repeatable)")

    p = command("decrypt", "decrypt a ciphertext; writes the plaintext to stdout or --out", cmd_decrypt)
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--ciphertext", help="the kb1:... text (default: read from stdin or --in)")
    p.add_argument("--in", dest="input", metavar="FILE")
    p.add_argument("--out", metavar="FILE", help="write the plaintext here instead of stdout")
    p.add_argument("--context", action="append", metavar="KEY=VALUE")

    p = command("rewrap", "move a ciphertext to the latest version, or to another key", cmd_rewrap)
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--ciphertext", help="the kb1:... text (default: read from stdin or --in)")
    p.add_argument("--in", dest="input", metavar="FILE")
    p.add_argument(
        "--to-key", metavar="KEY", type=key_name_arg, help="re-encrypt under this key instead (any backend)"
    )
    p.add_argument("--context", action="append", metavar="KEY=VALUE")

    p = command("datakey", "generate a data key for envelope encryption (prints its ciphertext)", cmd_datakey)
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--bytes", type=int, default=32, choices=[16, 32, 64])
    p.add_argument("--with-plaintext", action="store_true", help="also return the plaintext key (use --json)")
    p.add_argument("--context", action="append", metavar="KEY=VALUE")


def client_command(
    parent: Any,
    name: str,
    help_: str,
    fn: ClientCommand,
    client_args: Callable[[argparse.ArgumentParser], None],
) -> argparse.ArgumentParser:
    """A subcommand that talks to the broker: connection options, --json, and its function."""
    p: argparse.ArgumentParser = parent.add_parser(
        name, help=help_, description=help_[0].upper() + help_[1:] + "."
    )
    client_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(client_func=fn)
    return p


def run_client(args: argparse.Namespace, connect: Connect) -> int:
    fn: ClientCommand = args.client_func
    return fn(args, connect(args))
