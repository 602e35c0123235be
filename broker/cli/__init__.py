"""The ``keybroker`` command line.

Exit status: 0 success, 1 the operation failed, 2 bad usage or configuration.
Errors are one readable line on stderr, never a traceback; with ``--json`` they are
one JSON object there instead (stdout carries only results).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from broker.cli import audit, backup, certs, deploy, files, health, keys, policy, server, vault
from broker.cli.client import RemoteError, Unreachable
from broker.cli.common import EXIT_FAILED, EXIT_USAGE, Session, fail
from broker.errors import BrokerError, ConfigError
from broker.sdk.errors import ConfigurationError, InvalidInput

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "build_parser", "main"]

DESCRIPTION = """\
keybroker brokers key generation, rotation and cryptographic operations across
Vault transit, AWS KMS and a PKCS#11 HSM behind one mTLS API and one audit trail.

common tasks:
  keybroker dev                       run the whole local stack (like `vault server -dev`)
  keybroker health                    ask a running broker whether every backend can serve
  keybroker keys create|list|rotate|encrypt|decrypt|sign|verify ...   keys on a running broker
  keybroker encrypt-file|decrypt-file|rewrap-file ...   files and streams of any size (kbe1 envelopes)
  keybroker policy apply|show|list|explain ...          role policies (who may do what)
  keybroker bindings set|show                           which principal holds which roles
  keybroker grants create|list|revoke|retire ...        time-limited rights on one key
  keybroker certs issue SPIFFE_ID ...                   a client certificate from Vault PKI (operators)
  keybroker audit verify|query|merge|report             the tamper-evident audit trail
  keybroker serve --config FILE       run the broker daemon
  keybroker vault bootstrap ...       prepare a Vault (init, mounts, PKI, policy, AppRole)
  keybroker backup|restore ...        Vault's raft snapshot and the audit anchors, to a file and back
  keybroker deploy init [--dir DIR]   the certificates, secrets and configs docker-compose.yml mounts
  keybroker deploy hsm-token ...      initialise the HSM token from PIN files (compose hsm-init)

exit status: 0 done, 1 the operation failed (or a signature is invalid), 2 bad usage or settings.
Errors are one line on stderr; with --json, one JSON object on stderr instead:
  {"error": {"status": 403, "code": "forbidden", "detail": "...", "request_id": "...",
             "message": "...", "exit_status": 1}}
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keybroker",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # In the order `keybroker --help` lists them.
    for module in (server, vault, backup, certs, health, keys, files, policy, audit, deploy):
        module.add_parsers(sub)
    return parser


def _report_error(as_json: bool, exit_code: int, message: str, **fields: object) -> int:
    """One error: a readable line on stderr, or with --json one JSON object there (stdout stays data)."""
    if as_json:
        doc = {k: v for k, v in fields.items() if v not in (None, "")}
        print(json.dumps({"error": {**doc, "message": message, "exit_status": exit_code}}), file=sys.stderr)
        return exit_code
    return fail(message, exit_code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    session = Session(args)
    try:
        code: int = args.func(args, session)
    except ConfigError as exc:
        return _report_error(as_json, EXIT_USAGE, str(exc), code="usage")
    except ConfigurationError as exc:
        return _report_error(as_json, EXIT_USAGE, str(exc), code="usage")
    except Unreachable as exc:
        return _report_error(as_json, EXIT_FAILED, str(exc), code="unreachable")
    except RemoteError as exc:
        return _report_error(
            as_json,
            # status 0 invalid input: refused by the SDK's own checks before anything was sent
            EXIT_USAGE if exc.status == 0 and isinstance(exc, InvalidInput) else EXIT_FAILED,
            str(exc),
            status=exc.status or None,
            code=exc.code,
            detail=exc.detail,
            request_id=exc.request_id,
        )
    except BrokerError as exc:
        return _report_error(as_json, EXIT_FAILED, str(exc), code=exc.code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`keybroker audit query | head`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if os.environ.get("KEYBROKER_DEBUG"):
            raise
        message = f"unexpected {exc.__class__.__name__}: {exc} (set KEYBROKER_DEBUG=1 for a traceback)"
        return _report_error(as_json, EXIT_FAILED, message, code="unexpected")
    finally:
        session.close()
    return code
