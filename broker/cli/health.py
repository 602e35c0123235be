"""``keybroker health``: ask a running broker whether every backend can serve."""

from __future__ import annotations

import argparse
import json
from typing import Any

from broker.cli.common import EXIT_FAILED, Session, add_command

HEALTH_PARTS = ("vault", "kms", "hsm", "audit", "policy")


def cmd_health(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    # 503 is a health answer (which part cannot serve), so it is not retried on another replica.
    answer = client.request("GET", "/v1/sys/health", ok=(503,))
    status, body, addr = answer.status, answer.json(), answer.address
    is_health = isinstance(body, dict) and all(isinstance(body.get(p), dict) for p in HEALTH_PARTS)
    if not is_health:
        # A problem document (denied, refused, ...), not a health answer: say that, not five blank FAILs.
        error = answer.problem("/v1/sys/health")
        if status == 403:
            raise type(error)(
                status,
                error.code,
                f"this certificate may not read health (it needs a role allowing sys.health): {error.detail}",
                error.request_id,
            )
        raise error
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        replica = f" (replica {body['replica']})" if body.get("replica") else ""
        print(f"broker {addr}{replica}: {body.get('status', '?')}")
        for name in HEALTH_PARTS:
            part = body[name]
            mark = "ok  " if part.get("ok") else "FAIL"
            extras = ", ".join(f"{k}={v}" for k, v in part.items() if k not in ("ok", "peers"))
            print(f"  {mark} {name:<6} {extras}")
        # The Vault cluster as the replica sees it: one line per node, the leader marked.
        leader = str(body["vault"].get("leader_address", "")).rstrip("/")
        for peer in body["vault"].get("peers") or ():
            if isinstance(peer, dict):
                address = str(peer.get("address", "?"))
                mark = " (leader)" if address.rstrip("/") == leader else ""
                reason = f": {peer['error']}" if peer.get("error") else ""
                print(f"       vault node {address} {peer.get('state', '?')}{mark}{reason}")
    return 0 if status == 200 else EXIT_FAILED


def add_parsers(sub: Any) -> None:
    add_command(
        sub,
        "health",
        "ask a running broker whether every backend can serve",
        cmd_health,
        description="Call GET /v1/sys/health over mTLS. Exit 0 only when healthy.",
    )
