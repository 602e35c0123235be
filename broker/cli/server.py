"""``keybroker serve`` (the daemon) and ``keybroker dev`` (the whole local stack)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from broker.cli.common import EXIT_FAILED, EXIT_USAGE, Session, add_command, fail
from broker.workers import RESTART_NOTE_ENV

if TYPE_CHECKING:
    from broker.devstack.stack import DevStack


def cmd_serve(args: argparse.Namespace, session: Session) -> int:
    from broker.api.app import serve
    from broker.config.load import load_config
    from broker.log import configure_logging

    config = load_config(args.config)
    if args.check_config:
        from broker.config.offline_check import run_checks

        print(f"config {config.source}: loaded and validated")
        return 0 if run_checks(config, print) else EXIT_FAILED
    configure_logging(config.log.level)
    if args.worker is not None:
        from broker.workers import parse_worker, worker_config

        try:
            index, count = parse_worker(args.worker)
        except ValueError as exc:
            return fail(str(exc), EXIT_USAGE)
        note = os.environ.pop(RESTART_NOTE_ENV, None)
        asyncio.run(serve(worker_config(config, index), worker=(index, count), restart_note=note))
        return 0
    if args.workers > 1:
        from broker.workers import run_workers

        return run_workers(Path(args.config), args.workers)
    asyncio.run(serve(config))
    return 0


def _workers(value: str) -> int:
    from broker.workers import MAX_WORKERS

    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_WORKERS}")
    return int(value)


def cmd_dev(args: argparse.Namespace, session: Session) -> int:
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
    if args.replicas is not None and not args.ha:
        return fail("--replicas needs --ha (one broker replica per port from --port up)", 2)
    replicas = args.replicas if args.replicas is not None else (2 if args.ha else 1)
    # A cluster keeps its own state directory by default: a state directory is one shape for good.
    state_dir = args.state_dir or (".keybroker/dev-ha" if args.ha else ".keybroker/dev")
    try:
        stack = DevStack(
            Path(state_dir),
            broker_port=args.port,
            progress=lambda m: print(m, flush=True),
            ha=args.ha,
            replicas=replicas,
        )
    except StackError as exc:
        return fail(str(exc))
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
        return fail(str(exc))
    finally:
        # Idempotent; covers every way out, including errors not caught above.
        stack.stop()


def _print_dev_banner(stack: DevStack, seconds: float, steps: list[tuple[str, float]]) -> None:
    lay = stack.layout
    tls = lay.tls
    timing = ", ".join(f"{name} {t:.1f}s" for name, t in steps)
    if stack.cluster is not None:
        brokers = "\n".join(
            f"  broker      {r.url}        (mTLS; node {r.node}, audit {r.audit_dir})" for r in stack.replicas
        )
        vaults = "\n".join(
            f"  vault       {n.addr}   (OpenBao raft node {n.node_id}, auto-unsealed by KMS)"
            for n in stack.cluster.nodes
        )
        logs = f"{lay.logs}/{{broker-N,vault,vault-N,kms}}.log"
        state = f"{lay.root}   (Vault's root token and recovery keys: {lay.vault_init})"
    else:
        brokers = f"  broker      {stack.broker_url}        (mTLS; admin cert below)"
        vaults = (
            f"  vault       {stack.vault_addr}   (OpenBao, auto-unsealed by KMS; "
            f"root token in {lay.vault_init})"
        )
        logs = f"{lay.logs}/{{broker,vault,kms}}.log"
        state = str(lay.root)
    print(
        f"""
keybroker dev stack is ready in {seconds:.1f}s ({timing})

{brokers}
{vaults}
  kms         {stack.kms_endpoint}   (local KMS stand-in; keys kept in {lay.kms_state})
  hsm         SoftHSM2 token 'keybroker'   (SOFTHSM2_CONF={lay.softhsm_conf})
  state       {state}
  logs        {logs}
  vault audit {lay.vault_audit_log}

Environment for the CLI and your tools:   . {lay.env_file}

Try it:
  curl --cacert {tls}/ca.pem --cert {tls}/admin.crt --key {tls}/admin.key \\
       {stack.broker_url}/v1/sys/health

Ctrl-C stops everything; run `keybroker dev` again on the same state to resume.
""",
        flush=True,
    )


def add_parsers(sub: Any) -> None:
    serve = add_command(
        sub,
        "serve",
        "run the broker daemon",
        cmd_serve,
        online=False,
        json_output=False,
        description="Run the broker over mTLS "
        "until SIGTERM. Configuration: TOML (see config/broker.example.toml); any key can "
        "be overridden with KEYBROKER__SECTION__KEY environment variables.",
    )
    serve.add_argument("--config", required=True, metavar="FILE", help="broker configuration (TOML)")
    serve.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration and the files it names (offline), then exit: 0 usable, 1 not",
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="N worker processes on the one port (SO_REUSEPORT) under a parent that restarts any "
        "that dies; each writes its own audit chain in audit.directory/worker-I as node "
        "<audit.node>-wI (default: 1, a single process)",
    )
    # Internal: how the parent starts worker I of N.
    serve.add_argument("--worker", help=argparse.SUPPRESS)

    dev = add_command(
        sub,
        "dev",
        "run the full local stack: KMS, OpenBao (auto-unsealed by KMS), SoftHSM2, broker",
        cmd_dev,
        online=False,
        json_output=False,
        description="Start a local KMS stand-in, OpenBao with the awskms seal, a SoftHSM2 token and the "
        "broker, with certificates from Vault's PKI, all on 127.0.0.1. State lives in --state-dir; "
        "running again on the same directory resumes it (Vault unseals itself through KMS). Ctrl-C "
        "stops every process. For development only.",
    )
    dev.add_argument(
        "--state-dir",
        default=None,
        help="where all state lives (default: .keybroker/dev, with --ha .keybroker/dev-ha)",
    )
    dev.add_argument(
        "--port",
        type=int,
        default=8443,
        help="broker port on 127.0.0.1; with --ha replicas use the ports from here up (default: %(default)s)",
    )
    dev.add_argument(
        "--ha",
        action="store_true",
        help="a three-node OpenBao raft cluster (retry_join, every node auto-unsealed by KMS) "
        "and several broker replicas sharing it",
    )
    dev.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="broker replicas with --ha (default: 2); the env file lists every address",
    )
