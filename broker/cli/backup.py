"""``keybroker backup`` and ``keybroker restore``: Vault's raft snapshot and the anchors, to a file and back.

Both talk to Vault directly (like ``keybroker vault bootstrap``), never to a broker, with an
operator's Vault token from ``--token-file`` or ``VAULT_TOKEN``/``BAO_TOKEN``. Neither prints a
token, the backup key or anything from the snapshot.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

from broker.cli.common import EXIT_USAGE, Session, add_command, fail
from broker.cli.vault import safe_vault_address
from broker.vaultops.backup import backup_policy

BACKUP_HELP = """\
Take a raft snapshot of OpenBao (sys/storage/raft/snapshot) and write it, with every broker
node's audit anchor and a manifest (SHA-256 of each part, HMAC-SHA256 under --key-file), to
--out: a new file, mode 0600, written atomically (a hidden file linked into place when whole).

In the backup: all of Vault's storage: transit keys (every version), the broker's key registry,
role policies, bindings, grants, audit anchors, the PKI CAs and issued-certificate records, the
AppRole role and its secret ids, Vault policies, tokens. The snapshot stays encrypted under
Vault's barrier key, which only the seal (for awskms: the KMS key) can open.
Not in the backup: HSM objects (keys and the audit checkpoint key: use the HSM vendor's backup),
AWS KMS keys (they stay in KMS; the seal key must outlive every backup), the brokers' local
audit logs, broker configuration, TLS files, the AppRole secret-id file and the HSM PIN.

The token needs (a policy for a backup operator; root also works):
"""

BACKUP_EPILOG = """\
examples:
  openssl rand -hex 32 > backup.key && chmod 600 backup.key   # once; keep it apart from the backups
  VAULT_TOKEN=... keybroker backup --address https://vault:8200 --key-file backup.key \\
      --out /backups/keybroker-$(date +%F).kbbackup
"""

RESTORE_HELP = """\
Check FILE (its manifest's HMAC under --key-file, each part's SHA-256), check that the target
Vault fits it (same seal type, same or newer OpenBao, the same declared audit devices), then load
the snapshot with sys/storage/raft/snapshot-force and wait until Vault is active again. A damaged,
altered or mismatched file is refused before anything is changed.

The target is a NEW cluster started with the backed-up cluster's configuration: the same seal
(for awskms the SAME KMS key: the snapshot's keyring cannot be opened otherwise) and the same
audit device declarations. Uninitialised, it is initialised here with a throwaway token; already
initialised, give its root token. After the restore the backed-up cluster's root token and
recovery keys apply again. A target that already holds broker state is refused unless
--overwrite-existing (a restore replaces ALL of Vault's data).
"""

RESTORE_EPILOG = """\
examples:
  keybroker restore --verify-only --key-file backup.key backup.kbbackup    # check a file, touch nothing
  keybroker restore --address https://new-vault:8200 --key-file backup.key \\
      --approle-dir /etc/keybroker/approle backup.kbbackup
"""


def _target(args: argparse.Namespace) -> Any:
    from broker.errors import ConfigError
    from broker.vaultops.backup import VaultTarget

    address = args.address or os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR")
    if not address:
        raise ConfigError("give the Vault address with --address or VAULT_ADDR")
    if not safe_vault_address(address):
        raise ConfigError(
            f"refusing plain http to {address}: the token and the snapshot would cross the network "
            "unencrypted; use https:// (plain http is accepted only to a loopback address)"
        )
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--token-file: {exc.strerror}: {args.token_file}") from None
    else:
        token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    ca_file = Path(args.ca_file) if args.ca_file else None
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError(f"--ca-file: no such file: {ca_file}")
    return VaultTarget(address=address, token=token or None, ca_file=ca_file)


class _Meter:
    """A one-line byte counter on stderr, only when stderr is a terminal."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.on = sys.stderr.isatty()
        self.shown = False

    def __call__(self, done: int, total: int | None) -> None:
        if not self.on:
            return
        share = f" of {total / 1e6:.1f} MB ({100 * done // max(total, 1)}%)" if total else ""
        print(f"\r  {self.what}: {done / 1e6:.1f} MB{share}   ", end="", file=sys.stderr, flush=True)
        self.shown = True

    def end(self) -> None:
        if self.shown:
            print(file=sys.stderr, flush=True)
            self.shown = False


def _say(message: str) -> None:
    print(message, flush=True)


def cmd_backup(args: argparse.Namespace, session: Session) -> int:
    from broker.vaultops.backup import load_key, take_backup
    from broker.vaultops.policy import Mounts

    target = _target(args)
    if not target.token:
        return fail("give an operator token with --token-file or VAULT_TOKEN (or BAO_TOKEN)", EXIT_USAGE)
    key = load_key(Path(args.key_file))
    meter = _Meter("snapshot")
    try:
        result = take_backup(
            target,
            Path(args.out),
            key,
            mounts=Mounts(transit=args.transit_mount, kv=args.kv_mount, approle=args.approle_mount),
            progress=_say,
            byte_progress=meter,
        )
    finally:
        meter.end()
    manifest = result.manifest
    vault = manifest["vault"]
    _say(f"wrote {result.path} ({result.size} bytes, mode 0600)")
    _say(
        f"  vault      OpenBao {vault.get('version')}, {vault.get('seal_type')} seal, "
        f"cluster {vault.get('cluster_name')}"
    )
    snap = manifest["parts"]["vault.snap"]
    _say(f"  snapshot   {snap['bytes']} bytes, sha256 {snap['sha256']}")
    for node, anchor in sorted(manifest["anchors"].items()):
        _say(f"  anchor     node {node}: record {anchor.get('seq')} (epoch {anchor.get('epoch')})")
    if not manifest["anchors"]:
        _say("  anchor     none stored yet (no broker has checkpointed its audit log)")
    _say("  not in it  HSM objects, KMS keys, local audit logs, broker config and secret files (see --help)")
    return 0


def cmd_restore(args: argparse.Namespace, session: Session) -> int:
    from broker.vaultops.backup import read_backup, restore_backup

    key_path = Path(args.key_file)
    from broker.vaultops.backup import load_key

    backup = read_backup(Path(args.file), load_key(key_path))
    manifest = backup.manifest
    vault = manifest.get("vault") or {}
    _say(
        f"{args.file}: intact and authentic; taken {manifest.get('created')} from {vault.get('address')} "
        f"(OpenBao {vault.get('version')}, {vault.get('seal_type')} seal)"
    )
    if args.verify_only:
        return 0
    target = _target(args)
    meter = _Meter("snapshot")
    try:
        result = restore_backup(
            target,
            backup,
            overwrite=args.overwrite_existing,
            approle_dir=Path(args.approle_dir) if args.approle_dir else None,
            wait_seconds=args.wait,
            progress=_say,
            byte_progress=meter,
        )
    finally:
        meter.end()
    _say(f"restored into {target.address} in {result.seconds:.1f}s; Vault is active and unsealed")
    _say("next:")
    _say(
        "  tokens   the backed-up cluster's root token and recovery keys work again; "
        "the token used here does not"
    )
    if result.approle_checked:
        _say(
            f"  brokers  checked: the AppRole credentials in {args.approle_dir} log in "
            "and read the anchors back"
        )
    _say("  brokers  point [vault] address at this cluster and start them (their AppRole files work again)")
    _say("  audit    Vault's anchors are as of the backup, older than each broker's local log:")
    for node, doc in sorted(result.anchors.items()):
        _say(f"             node {node}: record {doc.get('seq')} (epoch {doc.get('epoch')})")
    _say(
        "           a broker whose audit directory still holds that record starts and moves the anchor\n"
        "           forward at its next checkpoint; one whose log ends before it (lost, or restored from an\n"
        "           older copy) stays closed (503) until an administrator runs `keybroker audit new-epoch`"
    )
    _say(
        "  keys     keys created, rotated or destroyed after the backup are as they were at the backup:\n"
        "           ciphertexts under later transit versions no longer decrypt; KMS and HSM keys made\n"
        "           later still exist in KMS/the HSM but the broker no longer lists them"
    )
    return 0


def _vault_args(p: argparse.ArgumentParser, *, credential_help: str) -> None:
    p.add_argument("--address", help="Vault address (default: $VAULT_ADDR, then $BAO_ADDR)")
    p.add_argument("--ca-file", metavar="PEM", help="CA bundle to verify Vault's TLS certificate")
    p.add_argument("--token-file", metavar="FILE", help=credential_help)
    p.add_argument(
        "--key-file",
        required=True,
        metavar="FILE",
        help="the backup key: at least 32 bytes as hex, mode 0600 (openssl rand -hex 32)",
    )


def add_parsers(sub: Any) -> None:
    backup = add_command(
        sub,
        "backup",
        "write a backup of Vault (raft snapshot) and the brokers' audit anchors to a file",
        cmd_backup,
        online=False,
        json_output=False,
        description=BACKUP_HELP + textwrap.indent(backup_policy(), "  "),
        epilog=BACKUP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _vault_args(backup, credential_help="operator token (default: $VAULT_TOKEN, then $BAO_TOKEN)")
    backup.add_argument(
        "--out", required=True, metavar="FILE", help="the backup file to create; must not exist"
    )
    backup.add_argument("--kv-mount", default="kb-kv", help="the broker's KV v2 mount (default: %(default)s)")
    backup.add_argument(
        "--transit-mount", default="kb-transit", help="recorded in the manifest (default: %(default)s)"
    )
    backup.add_argument(
        "--approle-mount",
        default="approle",
        help="the broker's AppRole mount, for restore --approle-dir (default: %(default)s)",
    )

    restore = add_command(
        sub,
        "restore",
        "restore a backup into a new Vault cluster (snapshot-force)",
        cmd_restore,
        online=False,
        json_output=False,
        description=RESTORE_HELP,
        epilog=RESTORE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    restore.add_argument("file", metavar="FILE", help="a file written by `keybroker backup`")
    _vault_args(
        restore,
        credential_help="root token of an initialised target (default: $VAULT_TOKEN, then $BAO_TOKEN); "
        "not needed for an uninitialised one",
    )
    restore.add_argument(
        "--verify-only", action="store_true", help="check the file and stop; contact no Vault"
    )
    restore.add_argument(
        "--overwrite-existing",
        action="store_true",
        help="restore even though the target holds broker state (rolls it back to the backup)",
    )
    restore.add_argument(
        "--approle-dir",
        metavar="DIR",
        help="afterwards, log in with the broker's role-id/secret-id here to prove it can start",
    )
    restore.add_argument(
        "--wait", type=float, default=120.0, metavar="SECONDS", help="how long Vault may take to come back"
    )
