"""``keybroker vault ...``: operator commands against Vault itself (not through the broker)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from broker.cli.common import EXIT_USAGE, Session, add_command, fail


def cmd_vault_bootstrap(args: argparse.Namespace, session: Session) -> int:
    from broker.vaultops.bootstrap import BootstrapOptions, bootstrap
    from broker.vaultops.policy import Mounts

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            return fail(f"--token-file: {exc.strerror}: {args.token_file}", EXIT_USAGE)
    else:
        token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    if args.ca_file:
        try:
            with open(args.ca_file, "rb"):
                pass
        except OSError as exc:
            return fail(f"--ca-file: {exc.strerror}: {args.ca_file}", EXIT_USAGE)
    address = args.address or os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR")
    if not address:
        return fail("give the Vault address with --address or VAULT_ADDR", EXIT_USAGE)
    if not safe_vault_address(address):
        return fail(
            f"refusing plain http to {address}: the root token and the AppRole secret would cross the "
            "network unencrypted; use https:// (plain http is accepted only to a loopback address)",
            EXIT_USAGE,
        )
    opts = BootstrapOptions(
        address=address,
        approle_dir=Path(args.approle_dir),
        init_output=Path(args.init_output) if args.init_output else None,
        token=token,
        ca_file=Path(args.ca_file) if args.ca_file else None,
        mounts=Mounts(transit=args.transit_mount, kv=args.kv_mount),
        trust_domain=args.trust_domain,
        role_name=args.role_name,
        token_ttl=args.token_ttl,
        token_max_ttl=args.token_max_ttl,
    )
    result = bootstrap(opts, progress=lambda m: print(m, flush=True))
    print(f"changed:   {', '.join(result.changed) or 'nothing'}")
    print(f"unchanged: {', '.join(result.unchanged) or 'nothing'}")
    print(f"AppRole credentials for the broker: {result.role_id_file}, {result.secret_id_file}")
    return 0


def safe_vault_address(address: str) -> bool:
    """https://, or plain http only to this host (the dev stack's Vault)."""
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")


def add_parsers(sub: Any) -> None:
    vault = sub.add_parser("vault", help="operate on Vault", description="Operator commands against Vault.")
    vsub = vault.add_subparsers(dest="vault_command", metavar="COMMAND", required=True)
    boot = add_command(
        vsub,
        "bootstrap",
        "make a Vault ready for the broker (idempotent)",
        cmd_vault_bootstrap,
        online=False,
        json_output=False,
        description="Initialise Vault if needed (recovery keys to --init-output, mode 0600), enable the "
        "transit, KV v2 and PKI mounts, create the CA and certificate roles, audit the X-Request-Id "
        "header, write the broker's Vault policy and AppRole, and write the AppRole role id and secret "
        "id into --approle-dir. Safe to run again: each step looks before it acts.",
        epilog="example:\n  keybroker vault bootstrap --address https://vault:8200 \\\n"
        "      --init-output /secure/vault-init.json --approle-dir /etc/keybroker/approle",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    boot.add_argument("--address", help="Vault address (default: $VAULT_ADDR)")
    boot.add_argument("--ca-file", help="CA bundle to verify Vault's TLS certificate")
    boot.add_argument(
        "--init-output",
        metavar="FILE",
        help="where to write recovery keys and root token if Vault is not initialised; must not exist",
    )
    boot.add_argument(
        "--token-file",
        metavar="FILE",
        help="operator token for an initialised Vault (default: $VAULT_TOKEN or $BAO_TOKEN)",
    )
    boot.add_argument(
        "--approle-dir",
        required=True,
        metavar="DIR",
        help="where to write the broker's role-id and secret-id files (mode 0600)",
    )
    boot.add_argument(
        "--role-name", default="keybroker-broker", help="AppRole role name (default: %(default)s)"
    )
    boot.add_argument("--token-ttl", default="1h", help="broker token TTL (default: %(default)s)")
    boot.add_argument("--token-max-ttl", default="24h", help="broker token max TTL (default: %(default)s)")
    boot.add_argument("--transit-mount", default="kb-transit", help="(default: %(default)s)")
    boot.add_argument("--kv-mount", default="kb-kv", help="(default: %(default)s)")
    boot.add_argument(
        "--trust-domain",
        default="keybroker.dev",
        help="SPIFFE trust domain client certificates may name (default: %(default)s)",
    )
