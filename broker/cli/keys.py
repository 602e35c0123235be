"""``keybroker keys ...``: the whole key lifecycle against a running broker, over mTLS.

Tables for people, ``--json`` for tools. Binary data crosses the command line as
files or standard input/output, never as an argument that would land in shell history.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from broker.cli.common import (
    Command,
    Session,
    add_command,
    add_group,
    context_pairs,
    create_private,
    key_name_arg,
    quote,
)
from broker.errors import BrokerError, ConfigError
from broker.sdk import new_idempotency_key
from broker.timeutil import format_duration
from broker.vocab import ENVIRONMENTS

EPILOG = """\
examples (after `keybroker dev`, in another shell: . .keybroker/dev/env):
  keybroker keys create payments --backend vault --environment prod --rotation-period 90d
  keybroker keys list --backend hsm
  echo -n 'card 4111' | keybroker keys encrypt payments --context tenant=acme > card.kb
  keybroker keys decrypt --context tenant=acme < card.kb      # the key named in card.kb
  keybroker keys rotate payments
  keybroker keys rewrap --context tenant=acme < card.kb        # to the key's latest version
  keybroker keys datakey payments --plaintext-out dek.bin > dek.kb   # envelope encryption
  keybroker keys create releases --backend hsm --type ecdsa-p256 --environment prod
  keybroker keys sign releases --in app.tar > app.tar.sig
  keybroker keys verify --signature-file app.tar.sig --in app.tar   # exit 0 valid, 1 invalid
  keybroker keys update payments --deletion-protection off
  keybroker keys schedule-destruction payments --pending-days 7
with --json an error is one JSON object on stderr: {"error": {"status", "code", "detail", ...}}
"""

# A kb1 ciphertext or signature names its key in the clear: kb1:<key>:<version>:<payload>.
_ENVELOPE = re.compile(r"^kb1:([a-z0-9][a-z0-9_.-]{0,62}):([0-9]+):[A-Za-z0-9_-]+$")


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
    return format_duration(int(seconds)) if seconds else "-"


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


def cmd_create(args: argparse.Namespace, session: Session) -> int:
    # The SDK sends an Idempotency-Key, so a retry after a lost answer makes no second key.
    key = session.client().create_key(
        args.name,
        backend=args.backend,
        environment=args.environment,
        key_type=args.type,
        rotation_period=args.rotation_period or None,
        deletion_protection=not args.no_deletion_protection,
        tags=context_pairs(args.tag, "--tag") if args.tag else None,
        description=args.description or None,
    )
    return _show(args, key)


def _page_size(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError("must be an integer from 1 to 1000")
    return int(value)


def cmd_list(args: argparse.Namespace, session: Session) -> int:
    filters = {k: getattr(args, k) or None for k in ("backend", "state", "environment", "tag")}
    # Page by page (the SDK follows the cursor), so no request asks for a whole large registry.
    keys = session.client().list_keys(**filters, page_size=args.page_size)
    if args.json:
        print(json.dumps(keys, indent=2))
    else:
        print_table(keys)
    return 0


def cmd_show(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    return _show(args, client.call("GET", f"/v1/keys/{quote(args.name)}"))


def cmd_update(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
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
    return _show(args, client.call("PATCH", f"/v1/keys/{quote(args.name)}", body))


def _action(action: str) -> Command:
    def run(args: argparse.Namespace, session: Session) -> int:
        client = session.client()
        body: dict[str, Any] = {}
        if action == "revoke":
            body["reason"] = args.reason
        if action == "schedule-destruction":
            body["pending_days"] = args.pending_days
        # rotate is the one change a blind retry would repeat (a second version): it carries a key.
        keyed = new_idempotency_key() if action == "rotate" else None
        path = f"/v1/keys/{quote(args.name)}/{action}"
        return _show(args, client.call("POST", path, body, idempotency_key=keyed))

    return run


def cmd_encrypt(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    data = _read_input(args)
    body = {"plaintext": base64.b64encode(data).decode(), "context": context_pairs(args.context)}
    out = client.call("POST", f"/v1/keys/{quote(args.name)}/encrypt", body)
    print(json.dumps(out) if args.json else out["ciphertext"])
    return 0


def _key_for(args: argparse.Namespace, envelope: str, what: str) -> str:
    """The key to ask: the one the ciphertext (or signature) names, checked against NAME if given.

    The name is in the clear in every kb1 envelope, so a mismatch is said here, before
    sending, rather than left to the broker's detail-free "decryption failed".
    """
    found = _ENVELOPE.match(envelope)
    if found is None:
        if args.name:
            return str(args.name)  # the broker decides; it gives malformed input no detail
        raise ConfigError(
            f"this is not a kb1 {what} (kb1:<key>:<version>:<payload>), so it names no key; "
            "check what was given, or name the key"
        )
    named, version = found.group(1), found.group(2)
    if args.name and args.name != named:
        raise ConfigError(
            f"the {what} was made by key {named!r} (version {version}), not {args.name!r}: "
            f"run the command with {named} (or without a key name: the {what} names it)"
        )
    return named


def cmd_decrypt(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    text = _read_text_input(args, "ciphertext")
    name = _key_for(args, text, "ciphertext")
    body = {"ciphertext": text, "context": context_pairs(args.context)}
    out = client.call("POST", f"/v1/keys/{quote(name)}/decrypt", body)
    if args.json:
        print(json.dumps(out))
    else:
        _write_output(args, base64.b64decode(out["plaintext"]))
    return 0


def cmd_rewrap(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    text = _read_text_input(args, "ciphertext")
    name = _key_for(args, text, "ciphertext")
    body: dict[str, Any] = {"ciphertext": text, "context": context_pairs(args.context)}
    if args.to_key:
        body["to_key"] = args.to_key
    out = client.call("POST", f"/v1/keys/{quote(name)}/rewrap", body)
    print(json.dumps(out) if args.json else out["ciphertext"])
    return 0


def cmd_datakey(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    wanted = bool(args.with_plaintext or args.plaintext_out)
    body = {"bytes": args.bytes, "context": context_pairs(args.context), "include_plaintext": wanted}
    if args.plaintext_out and Path(args.plaintext_out).exists():
        # Checked before asking, so no data key is made (and audited) only to be thrown away.
        raise ConfigError(f"--plaintext-out: {args.plaintext_out} already exists; refusing to overwrite it")
    out = client.call("POST", f"/v1/keys/{quote(args.name)}/datakey", body)
    if wanted and "plaintext" not in out:
        raise BrokerError("the broker answered without the plaintext data key it was asked for")
    if args.plaintext_out:
        create_private(args.plaintext_out, base64.b64decode(out.pop("plaintext")), "--plaintext-out")
        out["plaintext_out"] = args.plaintext_out
    if args.json:
        print(json.dumps(out))
    elif wanted and not args.plaintext_out:
        # Never dropped: line 1 the ciphertext to store, line 2 the data key (base64) to use and forget.
        print(out["ciphertext"])
        print(out["plaintext"])
    else:
        print(out["ciphertext"])
    return 0


def _message_digest(args: argparse.Namespace) -> str:
    """The SHA-256 digest to sign or check, base64: of --in FILE or stdin (hashed here), or --digest HEX."""
    if args.digest:
        if args.input:
            raise ConfigError("give the message (--in FILE or stdin) or --digest, not both")
        try:
            digest = bytes.fromhex(args.digest)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError("--digest takes a SHA-256 digest as 64 hex digits (as sha256sum prints)")
        return base64.b64encode(digest).decode()
    # Hashing here means any size of message works and only 32 bytes cross the network.
    return base64.b64encode(hashlib.sha256(_read_input(args)).digest()).decode()


def cmd_sign(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    body = {"digest": _message_digest(args), "algorithm": "ecdsa-sha256"}
    out = client.call("POST", f"/v1/keys/{quote(args.name)}/sign", body)
    if args.json:
        print(json.dumps(out))
    elif args.out:
        _write_output(args, (out["signature"] + "\n").encode())
    else:
        print(out["signature"])
    return 0


def _read_signature(args: argparse.Namespace) -> str:
    if args.signature and args.signature_file:
        raise ConfigError("give --signature or --signature-file, not both")
    if args.signature:
        return str(args.signature).strip()
    if not args.signature_file:
        raise ConfigError("give the signature with --signature kb1:... or --signature-file FILE")
    try:
        return Path(args.signature_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ConfigError(f"--signature-file: {reason}: {args.signature_file}") from None


def cmd_verify(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    signature = _read_signature(args)
    found = _ENVELOPE.match(signature)
    if args.name and found and found.group(1) != args.name:
        # Made by another key: not a valid signature by this one, whatever the other key says.
        if args.json:
            print(json.dumps({"valid": False, "key": args.name, "signed_by": found.group(1)}))
        else:
            print(f"INVALID: the signature was made by key {found.group(1)!r}, not {args.name!r}")
        return 1
    name = _key_for(args, signature, "signature")
    body = {"digest": _message_digest(args), "signature": signature, "algorithm": "ecdsa-sha256"}
    out = client.call("POST", f"/v1/keys/{quote(name)}/verify", body)
    valid = out.get("valid") is True
    if args.json:
        print(json.dumps({**out, "key": name}))
    else:
        verdict = "valid: signed by" if valid else "INVALID: not a signature of this message by"
        print(f"{verdict} key {name}")
    return 0 if valid else 1


# -- parser -------------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    ksub = add_group(
        sub,
        "keys",
        "create, rotate, suspend, revoke, destroy keys; encrypt, decrypt, sign, verify",
        "Manage keys on a running broker over mTLS (address and certificates from "
        "--addr/--ca-cert/--client-cert/--client-key or the KEYBROKER_* variables that "
        "`keybroker dev` writes to its env file).",
        EPILOG,
    )

    def command(name: str, help_: str, fn: Command, more: str = "", example: str = "") -> Any:
        p = add_command(ksub, name, help_, fn)
        if more:
            p.description = f"{p.description} {more[0].upper()}{more[1:]}."
        if example:
            # Raw, so the examples keep their lines; the description is wrapped here instead.
            p.description = textwrap.fill(p.description or "", 88)
            p.epilog = f"examples:\n  {example}"
            p.formatter_class = argparse.RawDescriptionHelpFormatter
        return p

    p = command("create", "create a key (version 1 is generated in the backend)", cmd_create)
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--backend", required=True, choices=["vault", "kms", "hsm"])
    p.add_argument("--type", default="aes256-gcm", choices=["aes256-gcm", "ecdsa-p256"])
    p.add_argument("--environment", required=True, choices=ENVIRONMENTS)
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
    p.add_argument("--environment", choices=ENVIRONMENTS)
    p.add_argument("--tag", metavar="KEY[=VALUE]")
    p.add_argument("--page-size", type=_page_size, default=500, metavar="1-1000", help="keys per request")

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
    ):
        command(action, help_, _action(action)).add_argument("name", type=key_name_arg)
    # The rule of Key.destruction_cancelled (broker/keys/model.py): a revoked key stays revoked.
    command(
        "cancel-destruction",
        "stop a scheduled destruction (active/suspended keys come back suspended, revoked keys stay revoked)",
        _action("cancel-destruction"),
        "a key that was active or suspended when destruction was scheduled comes back suspended (resume it "
        "to use it again); a revoked key comes back as it was: deactivated (decrypt and verify only) or "
        "compromised",
        "keybroker keys cancel-destruction payments\n  keybroker keys resume payments   # if it was in use",
    ).add_argument("name", type=key_name_arg)
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

    p = command(
        "decrypt",
        "decrypt a ciphertext; writes the plaintext to stdout or --out",
        cmd_decrypt,
        "the key is the one the ciphertext names (kb1:<key>:<version>:...); a NAME that differs is refused "
        "before anything is sent",
        "keybroker keys decrypt --context tenant=acme < card.kb\n"
        "  keybroker keys decrypt payments --in card.kb --out card.txt",
    )
    p.add_argument("name", nargs="?", type=key_name_arg, help="optional: the key the ciphertext names")
    p.add_argument("--ciphertext", help="the kb1:... text (default: read from stdin or --in)")
    p.add_argument("--in", dest="input", metavar="FILE")
    p.add_argument("--out", metavar="FILE", help="write the plaintext here instead of stdout")
    p.add_argument("--context", action="append", metavar="KEY=VALUE")

    p = command(
        "rewrap",
        "move a ciphertext to the latest version, or to another key",
        cmd_rewrap,
        "the source key is the one the ciphertext names; a NAME that differs is refused before anything "
        "is sent",
        "keybroker keys rewrap --context tenant=acme < card.kb > card-v2.kb\n"
        "  keybroker keys rewrap --to-key archive --context tenant=acme < card.kb",
    )
    p.add_argument("name", nargs="?", type=key_name_arg, help="optional: the key the ciphertext names")
    p.add_argument("--ciphertext", help="the kb1:... text (default: read from stdin or --in)")
    p.add_argument("--in", dest="input", metavar="FILE")
    p.add_argument(
        "--to-key", metavar="KEY", type=key_name_arg, help="re-encrypt under this key instead (any backend)"
    )
    p.add_argument("--context", action="append", metavar="KEY=VALUE")

    p = command(
        "datakey",
        "generate a data key for envelope encryption (prints its ciphertext)",
        cmd_datakey,
        "store the ciphertext next to your data; decrypt it with `keys decrypt` when you need the key again. "
        "With --with-plaintext the output is two lines: the ciphertext, then the data key (base64). "
        "--plaintext-out writes the raw data key to a new file (mode 0600) instead.",
        "keybroker keys datakey payments --plaintext-out dek.bin > dek.kb\n"
        "  keybroker keys datakey payments --with-plaintext --json | jq -r .plaintext",
    )
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--bytes", type=int, default=32, choices=[16, 32, 64])
    p.add_argument(
        "--with-plaintext",
        action="store_true",
        help="also print the data key itself (base64, second line; or the JSON 'plaintext' field)",
    )
    p.add_argument(
        "--plaintext-out",
        metavar="FILE",
        help="write the raw data key to FILE, created with mode 0600 (must not exist)",
    )
    p.add_argument("--context", action="append", metavar="KEY=VALUE")

    p = command(
        "sign",
        "sign a message (ECDSA P-256 over SHA-256) with an ecdsa-p256 key; prints the kb1 signature",
        cmd_sign,
        "the message comes from standard input or --in FILE and is hashed (SHA-256) here: only the digest "
        "is sent. Or give the digest with --digest HEX.",
        "keybroker keys sign releases --in app.tar > app.tar.sig\n"
        "  keybroker keys sign releases --digest \"$(sha256sum app.tar | cut -d' ' -f1)\"",
    )
    p.add_argument("name", type=key_name_arg)
    p.add_argument("--in", dest="input", metavar="FILE", help="the message (default: standard input)")
    p.add_argument("--digest", metavar="HEX", help="sign this SHA-256 digest (64 hex digits) instead")
    p.add_argument("--out", metavar="FILE", help="write the signature here instead of stdout")

    p = command(
        "verify",
        "check a kb1 signature over a message; exit 0 and 'valid', or exit 1 and 'INVALID'",
        cmd_verify,
        "the key is the one the signature names (NAME is optional; a signature by another key is INVALID). "
        "The message comes from standard input or --in FILE (hashed here), or give --digest HEX.",
        "keybroker keys verify --signature-file app.tar.sig --in app.tar\n"
        "  keybroker keys verify releases --signature kb1:releases:1:MEUC... < app.tar",
    )
    p.add_argument("name", nargs="?", type=key_name_arg, help="optional: the key that should have signed")
    p.add_argument("--signature", metavar="KB1", help="the kb1:... signature")
    p.add_argument("--signature-file", metavar="FILE", help="read the signature from FILE")
    p.add_argument("--in", dest="input", metavar="FILE", help="the message (default: standard input)")
    p.add_argument("--digest", metavar="HEX", help="check against this SHA-256 digest (64 hex digits)")
