"""The ``keybroker`` command line.

Exit status: 0 success, 1 the operation failed, 2 bad usage or configuration.
Errors are one readable line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import ssl
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from broker.errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from broker.client import BrokerClient
    from broker.devstack.stack import DevStack

EXIT_FAILED = 1
EXIT_USAGE = 2

DESCRIPTION = """\
keybroker brokers key generation, rotation and cryptographic operations across
Vault transit, AWS KMS and a PKCS#11 HSM behind one mTLS API and one audit trail.

common tasks:
  keybroker dev                       run the whole local stack (like `vault server -dev`)
  keybroker health                    ask a running broker whether every backend can serve
  keybroker keys create|list|rotate|encrypt|decrypt ...   manage keys on a running broker
  keybroker policy apply|show|list|explain ...          role policies (who may do what)
  keybroker bindings set|show                           which principal holds which roles
  keybroker grants create|list|revoke|retire ...        time-limited rights on one key
  keybroker audit verify|query|merge|report             the tamper-evident audit trail
  keybroker serve --config FILE       run the broker daemon
  keybroker vault bootstrap ...       prepare a Vault (init, mounts, PKI, policy, AppRole)
"""


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"keybroker: error: {message}", file=sys.stderr)
    return code


# -- serve ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.api.app import serve
    from broker.config.load import load_config
    from broker.log import configure_logging

    config = load_config(args.config)
    configure_logging(config.log.level)
    asyncio.run(serve(config))
    return 0


# -- dev --------------------------------------------------------------------------------


def cmd_dev(args: argparse.Namespace) -> int:
    from broker.devstack.processes import ChildFailed
    from broker.devstack.stack import DevStack, StackError

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack = DevStack(Path(args.state_dir), broker_port=args.port, progress=lambda m: print(m, flush=True))
    try:
        info = stack.start()
        _print_dev_banner(stack, info.startup_seconds, info.steps)
        while True:
            stack.check_children()
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping the stack ...", flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("stopped.", flush=True)
        return 0
    except (StackError, ChildFailed) as exc:
        return _fail(str(exc))
    finally:
        # Idempotent; covers every way out, including errors not caught above.
        stack.stop()


def _print_dev_banner(stack: DevStack, seconds: float, steps: list[tuple[str, float]]) -> None:
    lay = stack.layout
    tls = lay.tls
    timing = ", ".join(f"{name} {t:.1f}s" for name, t in steps)
    print(
        textwrap.dedent(f"""
        keybroker dev stack is ready in {seconds:.1f}s ({timing})

          broker      {stack.broker_url}        (mTLS; admin cert below)
          vault       {stack.vault_addr}   (OpenBao, auto-unsealed by KMS; root token in {lay.vault_init})
          kms         {stack.kms_endpoint}   (local KMS stand-in; keys kept in {lay.kms_state})
          hsm         SoftHSM2 token 'keybroker'   (SOFTHSM2_CONF={lay.softhsm_conf})
          state       {lay.root}
          logs        {lay.logs}/{{broker,vault,kms}}.log
          vault audit {lay.vault_audit_log}

        Environment for the CLI and your tools:   . {lay.env_file}

        Try it:
          curl --cacert {tls}/ca.pem --cert {tls}/admin.crt --key {tls}/admin.key \\
               {stack.broker_url}/v1/sys/health

        Ctrl-C stops everything; run `keybroker dev` again on the same state to resume.
        """),
        flush=True,
    )


# -- vault bootstrap --------------------------------------------------------------------


def cmd_vault_bootstrap(args: argparse.Namespace) -> int:
    from broker.vaultops.bootstrap import BootstrapOptions, bootstrap
    from broker.vaultops.policy import Mounts

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            return _fail(f"--token-file: {exc.strerror}: {args.token_file}", EXIT_USAGE)
    else:
        token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    address = args.address or os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR")
    if not address:
        return _fail("give the Vault address with --address or VAULT_ADDR", EXIT_USAGE)
    if not _safe_vault_address(address):
        return _fail(
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


def _safe_vault_address(address: str) -> bool:
    """https://, or plain http only to this host (the dev stack's Vault)."""
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")


# -- health -----------------------------------------------------------------------------


def _client_context(args: argparse.Namespace) -> tuple[str, ssl.SSLContext]:
    from broker.config.tls import client_ssl_context

    addr = args.addr or os.environ.get("KEYBROKER_ADDR")
    ca = args.ca_cert or os.environ.get("KEYBROKER_CACERT")
    cert = args.client_cert or os.environ.get("KEYBROKER_CLIENT_CERT")
    key = args.client_key or os.environ.get("KEYBROKER_CLIENT_KEY")
    missing = [
        name
        for name, v in (
            ("--addr/KEYBROKER_ADDR", addr),
            ("--ca-cert/KEYBROKER_CACERT", ca),
            ("--client-cert/KEYBROKER_CLIENT_CERT", cert),
            ("--client-key/KEYBROKER_CLIENT_KEY", key),
        )
        if not v
    ]
    if missing or not (addr and ca and cert and key):
        raise ConfigError(f"missing {', '.join(missing)} (after `keybroker dev`, source its env file)")
    if not addr.startswith("https://"):
        raise ConfigError(f"the broker address must be https://, got {addr!r}")
    try:
        return addr.rstrip("/"), client_ssl_context(Path(ca), Path(cert), Path(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the client certificate or CA: {exc}") from None


def _connect(args: argparse.Namespace) -> BrokerClient:
    from broker.client import BrokerClient

    addr, ctx = _client_context(args)
    return BrokerClient(addr, ctx)


def cmd_health(args: argparse.Namespace) -> int:
    client = _connect(args)
    answer = client.raw("GET", "/v1/sys/health")
    status, body, addr = answer.status, answer.body, client.address
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(f"broker {addr}: {body.get('status', '?')}")
        for name in ("vault", "kms", "hsm", "audit", "policy"):
            part = body.get(name, {})
            mark = "ok  " if part.get("ok") else "FAIL"
            extras = ", ".join(f"{k}={v}" for k, v in part.items() if k != "ok")
            print(f"  {mark} {name:<6} {extras}")
    return 0 if status == 200 else EXIT_FAILED


# -- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keybroker",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the broker daemon",
        description="Run the broker over mTLS "
        "until SIGTERM. Configuration: TOML (see config/broker.example.toml); any key can "
        "be overridden with KEYBROKER__SECTION__KEY environment variables.",
    )
    serve.add_argument("--config", required=True, metavar="FILE", help="broker configuration (TOML)")
    serve.set_defaults(func=cmd_serve)

    dev = sub.add_parser(
        "dev",
        help="run the full local stack: KMS, OpenBao (auto-unsealed by KMS), SoftHSM2, broker",
        description="Start a local KMS stand-in, OpenBao with the awskms seal, a SoftHSM2 token and the "
        "broker, with certificates from Vault's PKI, all on 127.0.0.1. State lives in --state-dir; "
        "running again on the same directory resumes it (Vault unseals itself through KMS). Ctrl-C "
        "stops every process. For development only.",
    )
    dev.add_argument(
        "--state-dir", default=".keybroker/dev", help="where all state lives (default: %(default)s)"
    )
    dev.add_argument("--port", type=int, default=8443, help="broker port on 127.0.0.1 (default: %(default)s)")
    dev.set_defaults(func=cmd_dev)

    vault = sub.add_parser("vault", help="operate on Vault", description="Operator commands against Vault.")
    vsub = vault.add_subparsers(dest="vault_command", metavar="COMMAND", required=True)
    boot = vsub.add_parser(
        "bootstrap",
        help="make a Vault ready for the broker (idempotent)",
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
    boot.set_defaults(func=cmd_vault_bootstrap)

    health = sub.add_parser(
        "health",
        help="ask a running broker whether every backend can serve",
        description="Call GET /v1/sys/health over mTLS. Exit 0 only when healthy.",
    )
    _client_args(health)
    health.add_argument("--json", action="store_true", help="print the raw JSON answer")
    health.set_defaults(func=cmd_health)

    from broker.cli_audit import add_audit_parser, run_audit
    from broker.cli_keys import add_keys_parser, run_client
    from broker.cli_policy import add_policy_parsers

    add_keys_parser(sub, _client_args)
    add_policy_parsers(sub, _client_args)
    add_audit_parser(sub, _client_args)
    for name in ("keys", "policy", "bindings", "grants"):
        sub.choices[name].set_defaults(func=lambda a: run_client(a, _connect))
    sub.choices["audit"].set_defaults(func=lambda a: run_audit(a, _connect))
    return parser


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", help="broker URL (default: $KEYBROKER_ADDR)")
    p.add_argument("--ca-cert", help="CA that signed the broker's certificate (default: $KEYBROKER_CACERT)")
    p.add_argument("--client-cert", help="your certificate (default: $KEYBROKER_CLIENT_CERT)")
    p.add_argument("--client-key", help="your private key (default: $KEYBROKER_CLIENT_KEY)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except BrokerError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("KEYBROKER_DEBUG"):
            raise
        return _fail(f"unexpected {exc.__class__.__name__}: {exc} (set KEYBROKER_DEBUG=1 for a traceback)")
    return code
