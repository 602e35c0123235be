"""Typed keys of aiohttp application and request state (the stores, clients and settings a handler reads)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from broker.api.idempotency import IdempotencyStore
    from broker.api.metrics import Metrics
    from broker.audit.sink import AuditSink
    from broker.backends.hsm import HsmClient
    from broker.backends.kms import KmsClient
    from broker.backends.vault import VaultClient
    from broker.config.model import Config
    from broker.keys.service import KeyService
    from broker.state.anchors import VaultAnchors
    from broker.state.grants import GrantStore
    from broker.state.policies import PolicyStore

SETTINGS: web.AppKey[Config] = web.AppKey("settings")
VAULT: web.AppKey[VaultClient] = web.AppKey("vault")
KMS: web.AppKey[KmsClient] = web.AppKey("kms")
HSM: web.AppKey[HsmClient] = web.AppKey("hsm")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
KEYS: web.AppKey[KeyService] = web.AppKey("keys")
POLICIES: web.AppKey[PolicyStore] = web.AppKey("policies")
GRANTS: web.AppKey[GrantStore] = web.AppKey("grants")
AUDIT: web.AppKey[AuditSink] = web.AppKey("audit")
AUDIT_HMAC_KEY: web.AppKey[bytes] = web.AppKey("audit_hmac_key")
# serve --workers: this worker's (index, count); absent in a single-process broker.
WORKER: web.AppKey[tuple[int, int]] = web.AppKey("worker")
ANCHORS: web.AppKey[VaultAnchors] = web.AppKey("anchors")
IDEMPOTENCY: web.AppKey[IdempotencyStore] = web.AppKey("idempotency")

# Request-scoped keys (aiohttp's request mapping takes plain strings).
REQUEST_ID = "keybroker.request_id"
PRINCIPAL = "keybroker.principal"
# The caller's X-Request-Id, when well-formed; the broker's own id is REQUEST_ID.
CLIENT_REQUEST_ID = "keybroker.client_request_id"
# What the request's audit record will say (broker.audit.events.RequestFacts), filled as it goes.
AUDIT_FACTS = "keybroker.audit_facts"

__all__ = [
    "ANCHORS",
    "AUDIT",
    "AUDIT_FACTS",
    "AUDIT_HMAC_KEY",
    "CLIENT_REQUEST_ID",
    "GRANTS",
    "HSM",
    "IDEMPOTENCY",
    "KEYS",
    "KMS",
    "METRICS",
    "POLICIES",
    "PRINCIPAL",
    "REQUEST_ID",
    "SETTINGS",
    "VAULT",
]
