"""A moto KMS server whose keys survive a restart (development stand-in for AWS KMS).

moto keeps its state in memory and draws key material from ``os.urandom``, so a
restarted moto would lose the key that unseals Vault, and every KMS-backed key
with it. This runs moto's own WSGI application and, after every call that
changes KMS state, writes the account's KMS state to a file (mode 0600, atomic
replace) before the response goes out; on start it loads that file back.

The file is a pickle of moto's model objects (cryptography keys as PKCS#8 DER),
so it is tied to the pinned moto minor version and is trusted input: it lives
in the dev state directory next to the keys it protects. Never a production path.

Run: ``python -m broker.devstack.kms_server --state FILE --port-file FILE``.
"""

from __future__ import annotations

import argparse
import copyreg
import io
import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker._files import write_private

# KMS actions that only read state; every other action is persisted.
READ_ONLY_ACTIONS = frozenset(
    {
        "Encrypt",
        "Decrypt",
        "ReEncrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateDataKeyPair",
        "GenerateDataKeyPairWithoutPlaintext",
        "GenerateRandom",
        "GenerateMac",
        "VerifyMac",
        "Sign",
        "Verify",
        "GetPublicKey",
        "GetKeyPolicy",
        "GetKeyRotationStatus",
        "GetParametersForImport",
    }
)
STATE_VERSION = 1

_PRIVATE_KEY_TYPES: tuple[type, ...] = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
)


def _load_private_key(der: bytes) -> Any:
    return serialization.load_der_private_key(der, None)


def _reduce_private_key(key: Any) -> tuple[Callable[..., Any], tuple[bytes]]:
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return _load_private_key, (der,)


def _dispatch_table() -> dict[type, Any]:
    table: dict[type, Any] = dict(copyreg.dispatch_table)
    # The concrete (Rust) classes are what pickle sees; find them from live instances.
    samples = [
        rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 - type probe only
        ec.generate_private_key(ec.SECP256R1()),
        ed25519.Ed25519PrivateKey.generate(),
    ]
    for sample in samples:
        table[type(sample)] = _reduce_private_key
    return table


class KmsState:
    """Load and save the KMS state of moto's default account."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._table = _dispatch_table()

    @staticmethod
    def _account() -> Any:
        from moto.core.models import DEFAULT_ACCOUNT_ID
        from moto.kms.models import kms_backends

        return kms_backends[DEFAULT_ACCOUNT_ID]

    def load(self) -> int:
        if not self.path.exists():
            return 0
        try:
            with self.path.open("rb") as fh:
                saved = pickle.load(fh)  # noqa: S301 - our own 0600 file in the dev state dir
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the operator
            raise SystemExit(
                f"kms_server: cannot read saved KMS state {self.path} ({exc.__class__.__name__}); "
                "it was written by another moto version or is damaged. Move the dev state "
                "directory aside to start afresh."
            ) from None
        if saved.get("version") != STATE_VERSION:
            raise SystemExit(f"kms_server: {self.path} has an unknown state version")
        account = self._account()
        count = 0
        for region, (keys, tagger) in saved["regions"].items():
            backend = account[region]
            backend.keys = keys
            backend.tagger = tagger
            count += len(keys)
        return count

    def save(self) -> None:
        account = self._account()
        regions = {region: (b.keys, b.tagger) for region, b in dict.items(account)}
        buf = io.BytesIO()
        pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = self._table
        with self._lock:
            pickler.dump({"version": STATE_VERSION, "regions": regions})
            write_private(self.path, buf.getvalue())


class PersistingApp:
    """WSGI middleware: persist KMS state after each state-changing call, before answering."""

    def __init__(self, app: Callable[..., Iterable[bytes]], state: KmsState) -> None:
        self.app = app
        self.state = state

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        action = target.rpartition(".")[2]
        body = list(self.app(environ, start_response))
        if action and action not in READ_ONLY_ACTIONS and not action.startswith(("Describe", "List")):
            self.state.save()
        return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.devstack.kms_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (default)")
    parser.add_argument("--state", type=Path, required=True, help="file that keeps KMS keys across restarts")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    state = KmsState(args.state)
    restored = state.load()
    app = PersistingApp(DomainDispatcherApplication(create_backend_app), state)
    server = make_server(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)
    port = server.server_address[1]

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if args.port_file:
        args.port_file.write_text(f"{port}\n")
    print(f"kms_server: listening on http://{args.host}:{port} ({restored} keys restored)", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    # Run the importable module, not this __main__ copy, so pickled references resolve on load.
    from broker.devstack import kms_server

    sys.exit(kms_server.main())
