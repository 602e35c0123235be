"""Build the aiohttp application and run it over mTLS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

from aiohttp import web

from broker import spans
from broker.api.audit_routes import add_audit_routes
from broker.api.edge import EdgeSite, bound_tls_read_buffer, protocol_checks, raise_open_file_limit
from broker.api.grant_routes import add_grant_routes
from broker.api.idempotency import IdempotencyStore, sweep_loop
from broker.api.key_routes import add_key_routes
from broker.api.metrics import Metrics
from broker.api.middleware import audit_trail, bounded_body, identity, problem_details, request_context
from broker.api.policy_routes import add_policy_routes
from broker.api.revocation import REVOCATIONS, Revocations
from broker.api.routes import add_routes
from broker.api.state import (
    ANCHORS,
    AUDIT,
    AUDIT_HMAC_KEY,
    GRANTS,
    HSM,
    IDEMPOTENCY,
    KEYS,
    KMS,
    METRICS,
    POLICIES,
    SETTINGS,
    VAULT,
    WORKER,
)
from broker.audit.sink import AuditSink
from broker.backends.hsm import HsmAuditSigner, HsmClient, HsmKeys
from broker.backends.kms import KmsClient, KmsKeys
from broker.backends.vault import VaultClient, VaultTransit
from broker.config.model import Config
from broker.config.secrets import read_secret_file
from broker.config.tls import server_ssl_context
from broker.errors import BrokerError, ConfigError
from broker.keys.service import Clock, KeyService, scheduler_loop
from broker.log import get_logger
from broker.state.anchors import VaultAnchors
from broker.state.grants import GrantStore, grant_purge_loop
from broker.state.policies import PolicyStore
from broker.state.registry import Registry
from broker.timeutil import now_utc
from broker.vocab import Backend

log = get_logger(__name__)


def create_app(config: Config, *, clock: Clock = now_utc) -> web.Application:
    app = web.Application(
        middlewares=[request_context, audit_trail, problem_details, identity, protocol_checks, bounded_body],
        client_max_size=config.server.max_body_bytes,
    )
    app[SETTINGS] = config
    app[METRICS] = Metrics()
    app[VAULT] = VaultClient(config.vault)
    app[KMS] = KmsClient(config.kms)
    app[HSM] = HsmClient(config.hsm)
    app[KEYS] = KeyService(
        Registry(app[VAULT], config.vault.kv_mount),
        {
            Backend.VAULT: VaultTransit(
                app[VAULT], config.vault.transit_mount, coalesce=config.vault.coalesce
            ),
            Backend.KMS: KmsKeys(app[KMS]),
            Backend.HSM: HsmKeys(app[HSM]),
        },
        clock=clock,
        cache_seconds=config.keys.cache_seconds,
        claim_seconds=config.keys.scheduler_claim_seconds,
        creation_lease_seconds=creation_lease_seconds(config),
    )
    app[POLICIES] = PolicyStore(
        app[VAULT],
        config.vault.kv_mount,
        break_glass=config.server.administrators,
        refresh_seconds=config.policy.refresh_seconds,
        max_stale_seconds=config.policy.max_stale_seconds,
    )
    app[IDEMPOTENCY] = IdempotencyStore(
        app[VAULT], config.vault.kv_mount, ttl_seconds=config.keys.idempotency_ttl_seconds, clock=clock
    )
    app[GRANTS] = GrantStore(app[VAULT], config.vault.kv_mount, clock=clock)
    # Each checkpoint's position goes to Vault (check-and-set, only forward), so a truncated or
    # wiped log is noticed, at verify and at this node's next start.
    app[ANCHORS] = VaultAnchors(app[VAULT], config.vault.kv_mount, config.audit.node)
    audit = config.audit
    app[AUDIT] = AuditSink(
        audit.directory,
        node=audit.node,
        max_file_bytes=audit.max_file_bytes,
        max_file_seconds=audit.max_file_seconds,
        checkpoint_every=audit.checkpoint_every,
        checkpoint_seconds=audit.checkpoint_seconds,
        min_free_bytes=audit.min_free_bytes,
        signer=HsmAuditSigner(app[HSM], node=audit.node),
        anchors=app[ANCHORS],
        checkpoint_max_failures=audit.checkpoint_max_failures,
        write_timeout_seconds=audit.write_timeout_seconds,
    )
    app[AUDIT_HMAC_KEY] = b""
    app[REVOCATIONS] = Revocations(app[VAULT], config.server)
    app.cleanup_ctx.append(_backends)
    app.cleanup_ctx.append(_revocations)
    app.cleanup_ctx.append(_audit)
    app.cleanup_ctx.append(_policies)
    app.cleanup_ctx.append(_scheduler)
    add_routes(app)
    add_key_routes(app)
    add_grant_routes(app)
    add_policy_routes(app)
    add_audit_routes(app)
    return app


def creation_lease_seconds(config: Config) -> float:
    """How long a key creation may hold its name before another may take it over: twice what
    the longest creation can take (two registry writes and one backend call, each within its
    deadline): 48 s with the default deadlines."""
    backend_call = max(config.vault.deadline_seconds, config.kms.deadline_seconds, config.hsm.timeout_seconds)
    return 2 * (2 * config.vault.deadline_seconds + backend_call)


async def _audit(app: web.Application) -> AsyncIterator[None]:
    """The HMAC key first (no key, no start: records would be unverifiable), then the sink."""
    app[AUDIT_HMAC_KEY] = read_hmac_key(app[SETTINGS].audit.hmac_key_file)
    await app[AUDIT].start()
    try:
        yield
    finally:
        await app[AUDIT].close()


async def _backends(app: web.Application) -> AsyncIterator[None]:
    started = []
    try:
        for client in (app[VAULT], app[KMS], app[HSM]):
            # Listed first: a start that fails half-way (a session opened, then login failed)
            # is closed too, not left to the collector ("Unclosed connector" at exit).
            started.append(client)
            await client.start()
        yield
    finally:
        for client in reversed(started):
            await client.close()


async def _revocations(app: web.Application) -> AsyncIterator[None]:
    """Read the client PKI's CRL before serving, then keep it fresh (broker.api.revocation)."""
    revocations = app[REVOCATIONS]
    if not revocations.enabled:
        log.warning(
            "crl_check_disabled", hint="server.crl_pki_mount is empty: revoked client certificates work"
        )
        yield
        return
    await revocations.refresh_logged()
    async with _background(revocations.refresh_loop(), "crl-refresh"):
        yield


async def _policies(app: web.Application) -> AsyncIterator[None]:
    """Read the policy before serving (if Vault answers), then keep it fresh in the background."""
    store = app[POLICIES]
    try:
        await store.load()
    except BrokerError as exc:
        log.warning("policy_not_loaded", error=exc.detail, hint="requests get 503 until it is read")
    async with _background(store.refresh_loop(), "policy-refresh"):
        yield


async def _scheduler(app: web.Application) -> AsyncIterator[None]:
    interval = app[SETTINGS].keys.scheduler_interval_seconds
    async with (
        _background(scheduler_loop(app[KEYS], interval), "key-scheduler"),
        _background(grant_purge_loop(app[GRANTS], interval), "grant-purge"),
        _background(sweep_loop(app[IDEMPOTENCY], interval), "idempotency-sweep"),
    ):
        yield


@contextlib.asynccontextmanager
async def _background(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def serve(
    config: Config,
    *,
    ready: asyncio.Event | None = None,
    worker: tuple[int, int] | None = None,
    restart_note: str | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain and close every backend client.

    ``worker``: (index, count) of a ``serve --workers`` process, which shares the port with
    its siblings; ``restart_note``: why its supervisor started it again (noted in its chain).
    """
    ssl_ctx = server_ssl_context(config.server)
    raise_open_file_limit(config.server)
    bound_tls_read_buffer()
    app = create_app(config)
    if worker is not None:
        app[WORKER] = worker
    if restart_note:
        app[AUDIT].note_restart(restart_note)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5)
    await runner.setup()
    # Not TCPSite: the edge site bounds handshakes, connections, idle and header time, and
    # answers aiohttp's own refusals as problem+json with an audit record (broker.api.edge).
    site = EdgeSite(runner, config.server, ssl_ctx, reuse_port=worker is not None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    debug_ms = os.environ.get("KEYBROKER_ASYNCIO_DEBUG_MS")
    if debug_ms:
        # For bench/: asyncio reports every callback that holds the loop longer than this.
        loop.set_debug(True)
        loop.slow_callback_duration = float(debug_ms) / 1000
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if spans.available():
        # For bench/: per-stage timings of each request, switched on and off by the bench.
        loop.add_signal_handler(signal.SIGUSR1, spans.toggle)
    try:
        await site.start()
        log.info(
            "listening",
            url=f"https://{config.server.host}:{config.server.port}",
            config=config.source,
        )
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def read_hmac_key(path: Path | None) -> bytes:
    """The audit HMAC key: 64 hex characters in a file that only the broker reads."""
    if path is None:
        raise ConfigError("set audit.hmac_key_file: the key that HMACs context values in audit records")
    text = read_secret_file(path, "audit.hmac_key_file")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise ConfigError("expected at least 64 hex characters (32 random bytes)", key="audit.hmac_key_file")
    return key
