"""The ``keybroker`` command line.

Exit status: 0 success, 1 the operation failed, 2 bad usage or configuration.
Errors are one readable line on stderr, never a traceback; with ``--json`` they are
one JSON object there instead (stdout carries only results).
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
  keybroker keys create|list|rotate|encrypt|decrypt|sign|verify ...   keys on a running broker
  keybroker policy apply|show|list|explain ...          role policies (who may do what)
  keybroker bindings set|show                           which principal holds which roles
  keybroker grants create|list|revoke|retire ...        time-limited rights on one key
  keybroker audit verify|query|merge|report             the tamper-evident audit trail
  keybroker serve --config FILE       run the broker daemon
  keybroker vault bootstrap ...       prepare a Vault (init, mounts, PKI, policy, AppRole)

exit status: 0 done, 1 the operation failed (or a signature is invalid), 2 bad usage or settings.
Errors are one line on stderr; with --json, one JSON object on stderr instead:
  {"error": {"status": 403, "code": "forbidden", "detail": "...", "request_id": "...",
             "message": "...", "exit_status": 1}}
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
    if args.ca_file:
        try:
            with open(args.ca_file, "rb"):
                pass
        except OSError as exc:
            return _fail(f"--ca-file: {exc.strerror}: {args.ca_file}", EXIT_USAGE)
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


# Connection settings: (namespace attribute, flag, environment variable, what the file is).
_SETTINGS = (
    ("addr", "--addr", "KEYBROKER_ADDR", "the broker address"),
    ("ca_cert", "--ca-cert", "KEYBROKER_CACERT", "the broker's CA"),
    ("client_cert", "--client-cert", "KEYBROKER_CLIENT_CERT", "your certificate"),
    ("client_key", "--client-key", "KEYBROKER_CLIENT_KEY", "your private key"),
)


def _client_context(args: argparse.Namespace) -> tuple[str, ssl.SSLContext]:
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


def _connect(args: argparse.Namespace) -> BrokerClient:
    from broker.client import BrokerClient

    addr, ctx = _client_context(args)
    return BrokerClient(addr, ctx)


HEALTH_PARTS = ("vault", "kms", "hsm", "audit", "policy")


def cmd_health(args: argparse.Namespace) -> int:
    from broker.client import RemoteError

    client = _connect(args)
    answer = client.raw("GET", "/v1/sys/health")
    status, body, addr = answer.status, answer.body, client.address
    is_health = isinstance(body, dict) and all(isinstance(body.get(p), dict) for p in HEALTH_PARTS)
    if not is_health:
        # A problem document (denied, refused, ...), not a health answer: say that, not five blank FAILs.
        error = RemoteError.of(answer)
        if status == 403:
            raise RemoteError(
                status,
                error.problem_code,
                f"this certificate may not read health (it needs a role allowing sys.health): "
                f"{error.problem_detail}",
                error.request_id,
            )
        raise error
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print(f"broker {addr}: {body.get('status', '?')}")
        for name in HEALTH_PARTS:
            part = body[name]
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


def _report_error(as_json: bool, exit_code: int, message: str, **fields: object) -> int:
    """One error: a readable line on stderr, or with --json one JSON object there (stdout stays data)."""
    if as_json:
        doc = {k: v for k, v in fields.items() if v not in (None, "")}
        print(json.dumps({"error": {**doc, "message": message, "exit_status": exit_code}}), file=sys.stderr)
        return exit_code
    return _fail(message, exit_code)


def main(argv: Sequence[str] | None = None) -> int:
    from broker.client import RemoteError, Unreachable

    args = build_parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        return _report_error(as_json, EXIT_USAGE, str(exc), code="usage")
    except RemoteError as exc:
        return _report_error(
            as_json,
            EXIT_FAILED,
            str(exc),
            status=exc.http_status,
            code=exc.problem_code,
            detail=exc.problem_detail,
            request_id=exc.request_id,
        )
    except Unreachable as exc:
        return _report_error(as_json, EXIT_FAILED, str(exc), code="unreachable")
    except BrokerError as exc:
        return _report_error(as_json, EXIT_FAILED, str(exc), code=exc.code)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("KEYBROKER_DEBUG"):
            raise
        message = f"unexpected {exc.__class__.__name__}: {exc} (set KEYBROKER_DEBUG=1 for a traceback)"
        return _report_error(as_json, EXIT_FAILED, message, code="unexpected")
    return code
