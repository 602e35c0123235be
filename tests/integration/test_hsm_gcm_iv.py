"""``hsm.gcm_iv``: who makes the AES-GCM IV, on the real SoftHSM2 token.

SoftHSM uses the IV it is given and never writes one back, so the ``token`` mode is
tested twice: against SoftHSM itself (it must fail closed) and against SoftHSM behind
``p11shim/gcm_token_iv.c``, a PKCS#11 module that does what AWS CloudHSM documents
(ignore the request IV, generate one, write it into the caller's ``pIv`` buffer) and
passes everything else to SoftHSM. No real CloudHSM is involved.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from broker.devstack.stack import DevStack, find_softhsm_library
from broker.keys.ciphertext import decode
from tests.integration.conftest import extra_broker, https
from tests.integration.keyops import b64, create_key, unb64
from tests.integration.shims import build_shim

IV_BYTES = 12


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The IV-writing PKCS#11 module, compiled for this run (a C compiler is a test prerequisite)."""
    return build_shim("gcm_token_iv", tmp_path_factory.mktemp("p11shim"))


@contextmanager
def replica(stack: DevStack, tmp: Path, name: str, **env: str) -> Iterator[str]:
    """A broker on the stack's Vault, KMS and token with extra environment; yields its URL."""
    with extra_broker(stack, tmp, name, env=env) as broker:
        yield broker.url


def via_shim(shim: Path, mode: str, iv_mode: str) -> dict[str, str]:
    return {
        "KEYBROKER__HSM__LIBRARY": str(shim),
        "KEYBROKER__HSM__GCM_IV": mode,
        "KEYBROKER_SHIM_TARGET": str(find_softhsm_library()),
        "KEYBROKER_SHIM_IV": iv_mode,
    }


def encrypt(
    stack: DevStack, url: str, key: str, plaintext: bytes, ctx: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    reply = https(
        stack, f"/v1/keys/{key}/encrypt", url=url, body={"plaintext": b64(plaintext), "context": ctx}
    )
    return reply.status, reply.json()


def decrypt(stack: DevStack, url: str, key: str, ciphertext: str, ctx: dict[str, str]) -> bytes:
    reply = https(stack, f"/v1/keys/{key}/decrypt", url=url, body={"ciphertext": ciphertext, "context": ctx})
    assert reply.status == 200, reply.body
    return unb64(reply.json()["plaintext"])


def stored_iv(ciphertext: str) -> bytes:
    return decode(ciphertext).payload[:IV_BYTES]


def test_token_mode_stores_the_iv_the_token_wrote_and_round_trips(
    stack: DevStack, shim: Path, tmp_path: Path
) -> None:
    """A token that writes its own IV: the broker stores exactly that IV, and both modes decrypt it."""
    key = create_key(stack, "hsm")
    ctx = {"tenant": "t1"}
    with replica(stack, tmp_path, "broker-token-iv", **via_shim(shim, "token", "random")) as token_url:
        sealed = []
        for i in range(5):
            status, body = encrypt(stack, token_url, key, f"secret {i}".encode(), ctx)
            assert status == 200, body
            sealed.append(body["ciphertext"])
        ivs = [stored_iv(c) for c in sealed]
        # The broker handed the token an all-zero buffer; what is stored is what the token wrote.
        assert all(len(iv) == IV_BYTES and iv != bytes(IV_BYTES) for iv in ivs)
        assert len(set(ivs)) == len(ivs)
        # GCM authenticates the IV: these decrypt only if the stored IV is the one the token used.
        for i, ciphertext in enumerate(sealed):
            assert decrypt(stack, token_url, key, ciphertext, ctx) == f"secret {i}".encode()
            assert decrypt(stack, stack.broker_url, key, ciphertext, ctx) == f"secret {i}".encode()
        # And the other way: a host-mode ciphertext decrypts through the token-mode broker.
        status, body = encrypt(stack, stack.broker_url, key, b"from host mode", ctx)
        assert status == 200, body
        assert decrypt(stack, token_url, key, body["ciphertext"], ctx) == b"from host mode"
        # Data keys are sealed the same way.
        reply = https(stack, f"/v1/keys/{key}/datakey", url=token_url, body={"context": ctx})
        assert reply.status == 200, reply.body
        wrapped = reply.json()["ciphertext"]
        assert stored_iv(wrapped) != bytes(IV_BYTES)
        assert decrypt(stack, stack.broker_url, key, wrapped, ctx) == unb64(reply.json()["plaintext"])


def test_token_mode_on_a_token_that_keeps_the_host_buffer_fails_closed(
    stack: DevStack, tmp_path: Path
) -> None:
    """SoftHSM itself does not write an IV back: token mode refuses rather than store a zero IV."""
    key = create_key(stack, "hsm")
    with replica(stack, tmp_path, "broker-token-iv-softhsm", KEYBROKER__HSM__GCM_IV="token") as url:
        status, body = encrypt(stack, url, key, b"never sealed under a zero IV", {})
        assert status == 502, body
        assert body["code"] == "backend_error"
        assert "hsm.gcm_iv" in body["detail"]
        reply = https(stack, f"/v1/keys/{key}/datakey", url=url, body={"context": {}})
        assert reply.status == 502, reply.body
        assert "plaintext" not in reply.json()
        assert https(stack, "/v1/sys/health", url=url).status == 200


def test_host_mode_refuses_a_token_that_replaces_the_iv(stack: DevStack, shim: Path, tmp_path: Path) -> None:
    """A CloudHSM-like token under ``host`` would make the stored IV wrong: refused, naming the switch."""
    key = create_key(stack, "hsm")
    with replica(stack, tmp_path, "broker-host-iv-shim", **via_shim(shim, "host", "random")) as url:
        status, body = encrypt(stack, url, key, b"payload", {})
        assert status == 502, body
        assert 'hsm.gcm_iv = "token"' in body["detail"]


def test_token_mode_refuses_a_repeated_or_overlong_token_iv(
    stack: DevStack, shim: Path, tmp_path: Path
) -> None:
    """A token IV seen before (a broken generator) or longer than 12 bytes is never stored."""
    key = create_key(stack, "hsm")
    with replica(stack, tmp_path, "broker-token-iv-fixed", **via_shim(shim, "token", "fixed")) as url:
        first, body = encrypt(stack, url, key, b"one", {})
        assert first == 200, body
        assert stored_iv(body["ciphertext"]) == b"\x5a" * IV_BYTES
        second, body = encrypt(stack, url, key, b"two", {})
        assert second == 502, body
        assert "before" in body["detail"]
    with replica(stack, tmp_path, "broker-token-iv-long", **via_shim(shim, "token", "long")) as url:
        status, body = encrypt(stack, url, key, b"three", {})
        assert status == 502, body
        assert "longer than 12 bytes" in body["detail"]


def test_host_mode_draws_a_fresh_iv_per_message(stack: DevStack) -> None:
    """The default mode: 50 encryptions of one plaintext under one key never share an IV."""
    key = create_key(stack, "hsm")
    ivs = set()
    for _ in range(50):
        status, body = encrypt(stack, stack.broker_url, key, b"same plaintext", {"a": "b"})
        assert status == 200, body
        iv = stored_iv(body["ciphertext"])
        assert iv != bytes(IV_BYTES)
        ivs.add(iv)
    assert len(ivs) == 50
