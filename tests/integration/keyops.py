"""Helpers for key tests against the running stack: HTTP calls with JSON, backend inspection."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from broker.backends.hsm import HsmClient, HsmKeys, object_label
from broker.backends.kms import KmsClient, KmsKeys
from broker.backends.vault import VaultClient, VaultTransit
from broker.config.load import load_config
from broker.devstack.stack import DEV_AWS_ENV, DevStack
from broker.keys.service import KeyService
from broker.state.registry import Registry
from broker.vocab import Backend
from tests.integration.conftest import Reply, https


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def call(stack: DevStack, path: str, body: Any = None, *, method: str | None = None, **kw: Any) -> Reply:
    return https(stack, path, method=method, body=body, **kw)


def create_key(stack: DevStack, backend: str, *, type_: str = "aes256-gcm", **extra: Any) -> str:
    name = unique(f"t-{backend}")
    reply = call(
        stack,
        "/v1/keys",
        {"name": name, "backend": backend, "type": type_, "environment": "dev", **extra},
    )
    assert reply.status == 201, reply.body
    return name


def encrypt(
    stack: DevStack, name: str, plaintext: bytes, context: dict[str, str] | None = None, **kw: Any
) -> Reply:
    body = {"plaintext": b64(plaintext), "context": context or {}}
    return call(stack, f"/v1/keys/{name}/encrypt", body, **kw)


def decrypt(stack: DevStack, name: str, ciphertext: str, context: dict[str, str] | None = None) -> Reply:
    return call(stack, f"/v1/keys/{name}/decrypt", {"ciphertext": ciphertext, "context": context or {}})


def lifecycle(stack: DevStack, name: str, action: str, body: Any = None) -> Reply:
    return call(stack, f"/v1/keys/{name}/{action}", body if body is not None else {})


@asynccontextmanager
async def key_service(stack: DevStack, clock: Callable[[], datetime]) -> AsyncIterator[KeyService]:
    """A second, in-process broker core on the same Vault, KMS and HSM, with its own clock.

    The broker is stateless, so what this one does (a destruction after a window
    that has not really passed) is what the running broker shows next.
    """
    os.environ["SOFTHSM2_CONF"] = str(stack.layout.softhsm_conf)
    for name, value in DEV_AWS_ENV.items():
        os.environ.setdefault(name, value)
    config = load_config(stack.layout.broker_config)
    vault, kms, hsm = VaultClient(config.vault), KmsClient(config.kms), HsmClient(config.hsm)
    for client in (vault, kms, hsm):
        await client.start()
    try:
        yield KeyService(
            Registry(vault, config.vault.kv_mount),
            {
                Backend.VAULT: VaultTransit(vault, config.vault.transit_mount),
                Backend.KMS: KmsKeys(kms),
                Backend.HSM: HsmKeys(hsm),
            },
            clock=clock,
        )
    finally:
        for client in (hsm, kms, vault):
            await client.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def hsm_objects_with_label(stack: DevStack, key_name: str) -> int:
    """How many token objects carry the key's label, counted in the HSM itself."""
    import pkcs11
    from pkcs11 import Attribute

    os.environ["SOFTHSM2_CONF"] = str(stack.layout.softhsm_conf)
    lib = pkcs11.lib(str(load_config(stack.layout.broker_config).hsm.library))
    token = lib.get_token(token_label="keybroker")
    pin = stack.layout.hsm_pin.read_text().strip()
    with token.open(user_pin=pin) as session:
        return len(list(session.get_objects({Attribute.LABEL: object_label(key_name)})))


def transit_key_status(stack: DevStack, key_name: str) -> int:
    """HTTP status of reading the transit key with the root token (404 once deleted)."""
    client = stack.vault_client()
    resp = client.adapter.request("GET", f"v1/kb-transit/keys/{key_name}", raise_exception=False)
    return int(resp.status_code)


def kms_states(stack: DevStack, key_ids: list[str]) -> list[str]:
    kms = stack.kms_client()
    return [kms.describe_key(KeyId=k)["KeyMetadata"]["KeyState"] for k in key_ids]


def registry_record(stack: DevStack, key_name: str) -> dict[str, Any]:
    """The key's registry entry as stored in Vault KV, read with the root token."""
    client = stack.vault_client()
    out = client.secrets.kv.v2.read_secret_version(
        path=f"keys/{key_name}", mount_point="kb-kv", raise_on_deleted_version=True
    )
    record: dict[str, Any] = out["data"]["data"]
    return record
