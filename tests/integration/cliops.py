"""Running ``keybroker`` as a user does, in a subprocess, against the test stack."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from broker.devstack.stack import DevStack


def keybroker(
    stack: DevStack | None,
    *args: str,
    stdin: bytes = b"",
    who: str = "admin",
    cert: Path | None = None,
    key: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """``keybroker ARGS`` with the dev env file's settings for the dev certificate ``who`` (or the
    given ``cert``/``key``); ``stack=None`` runs it with no broker settings at all (offline work)."""
    settings: dict[str, str] = {}
    if stack is not None:
        tls = stack.layout.tls
        settings = {
            "KEYBROKER_ADDR": stack.broker_url,
            "KEYBROKER_CACERT": str(tls / "ca.pem"),
            "KEYBROKER_CLIENT_CERT": str(cert or tls / f"{who}.crt"),
            "KEYBROKER_CLIENT_KEY": str(key or tls / f"{who}.key"),
        }
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, **settings, **(env or {})},
        timeout=120,
        check=False,
    )
