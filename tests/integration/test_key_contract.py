"""The key contract, the same on every backend: real OpenBao transit, moto KMS server, SoftHSM2.

Every test runs three times, once per backend, through the running broker's HTTP API;
where the backend itself must show something (material gone), the test asks it directly.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest

from broker.devstack.stack import DevStack
from tests.integration.keyops import (
    b64,
    call,
    create_key,
    decrypt,
    encrypt,
    hsm_objects_with_label,
    key_service,
    kms_states,
    lifecycle,
    registry_record,
    run,
    transit_key_status,
    unb64,
)

BACKENDS = ["vault", "kms", "hsm"]
CONTEXT = {"tenant": "acme", "purpose": "contract-test"}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _sealed(stack: DevStack, name: str, plaintext: bytes, context: dict[str, str] | None = None) -> str:
    reply = encrypt(stack, name, plaintext, context)
    assert reply.status == 200, reply.body
    return str(reply.json()["ciphertext"])


def test_round_trip_with_context(stack: DevStack, backend: str) -> None:
    """Plaintext comes back only with the same context; the ciphertext names key and version."""
    name = create_key(stack, backend)
    plaintext = os.urandom(100)

    ciphertext = _sealed(stack, name, plaintext, CONTEXT)
    reply = decrypt(stack, name, ciphertext, CONTEXT)

    assert ciphertext.startswith(f"kb1:{name}:1:")
    assert reply.status == 200
    assert unb64(reply.json()["plaintext"]) == plaintext


def test_every_decryption_failure_looks_the_same(stack: DevStack, backend: str) -> None:
    """Wrong context, a flipped byte, another key's ciphertext: one detail-free 400."""
    name, other = create_key(stack, backend), create_key(stack, backend)
    ciphertext = _sealed(stack, name, b"secret", CONTEXT)
    foreign = _sealed(stack, other, b"secret", CONTEXT)
    prefix, _, body = ciphertext.rpartition(":")
    flipped = f"{prefix}:{body[:10]}{'A' if body[10] != 'A' else 'B'}{body[11:]}"
    relabelled = f"kb1:{name}:1:{foreign.rpartition(':')[2]}"

    replies = [
        decrypt(stack, name, ciphertext, {**CONTEXT, "tenant": "other"}),
        decrypt(stack, name, ciphertext, {}),
        decrypt(stack, name, flipped, CONTEXT),
        decrypt(stack, name, foreign, CONTEXT),
        decrypt(stack, name, relabelled, CONTEXT),
        decrypt(stack, name, "not-a-ciphertext", CONTEXT),
    ]

    shapes = {(r.status, r.json()["code"], r.json()["detail"]) for r in replies}
    assert shapes == {(400, "decryption_failed", "Decryption failed")}


def test_rotation_keeps_old_ciphertext_and_min_decrypt_version_retires_it(
    stack: DevStack, backend: str
) -> None:
    """After a rotation new ciphertexts carry v2 and v1 still decrypts, until v1 is retired."""
    name = create_key(stack, backend)
    old = _sealed(stack, name, b"old data", CONTEXT)

    rotated = lifecycle(stack, name, "rotate")
    new = _sealed(stack, name, b"new data", CONTEXT)
    old_before = decrypt(stack, name, old, CONTEXT)
    patched = call(stack, f"/v1/keys/{name}", {"min_decrypt_version": 2}, method="PATCH")
    old_after = decrypt(stack, name, old, CONTEXT)
    new_after = decrypt(stack, name, new, CONTEXT)

    assert rotated.status == 200
    assert rotated.json()["latest_version"] == 2
    assert new.startswith(f"kb1:{name}:2:")
    assert unb64(old_before.json()["plaintext"]) == b"old data"
    assert patched.status == 200
    assert old_after.status == 409
    assert unb64(new_after.json()["plaintext"]) == b"new data"


def test_suspend_refuses_both_ways_and_resume_restores(stack: DevStack, backend: str) -> None:
    """A suspended key neither encrypts nor decrypts (409); resumed, it does both again."""
    name = create_key(stack, backend)
    ciphertext = _sealed(stack, name, b"payload", CONTEXT)

    suspended = lifecycle(stack, name, "suspend")
    enc_while, dec_while = encrypt(stack, name, b"x", CONTEXT), decrypt(stack, name, ciphertext, CONTEXT)
    resumed = lifecycle(stack, name, "resume")
    enc_after, dec_after = encrypt(stack, name, b"x", CONTEXT), decrypt(stack, name, ciphertext, CONTEXT)

    assert (suspended.status, suspended.json()["state"]) == (200, "suspended")
    assert (enc_while.status, dec_while.status) == (409, 409)
    assert enc_while.json()["code"] == "conflict"
    assert (resumed.status, resumed.json()["state"]) == (200, "active")
    assert (enc_after.status, dec_after.status) == (200, 200)


def test_revoke_retired_decrypts_only_and_compromised_nothing(stack: DevStack, backend: str) -> None:
    """Retired: encrypt 409, decrypt works. Compromised: both 409."""
    name = create_key(stack, backend)
    ciphertext = _sealed(stack, name, b"payload", CONTEXT)

    retired = lifecycle(stack, name, "revoke", {"reason": "retired"})
    retired_enc, retired_dec = encrypt(stack, name, b"x", CONTEXT), decrypt(stack, name, ciphertext, CONTEXT)
    compromised = lifecycle(stack, name, "revoke", {"reason": "compromised"})
    comp_enc, comp_dec = encrypt(stack, name, b"x", CONTEXT), decrypt(stack, name, ciphertext, CONTEXT)

    assert retired.json()["state"] == "deactivated"
    assert (retired_enc.status, retired_dec.status) == (409, 200)
    assert compromised.json()["state"] == "compromised"
    assert (comp_enc.status, comp_dec.status) == (409, 409)


def test_destruction_refused_under_protection_and_done_when_the_window_ends(
    stack: DevStack, backend: str
) -> None:
    """Protection refuses scheduling; once the window has passed the material is gone in the backend."""
    name = create_key(stack, backend)
    lifecycle(stack, name, "rotate")
    materials = [v["material"] for v in registry_record(stack, name)["versions"]]

    protected = lifecycle(stack, name, "schedule-destruction", {"pending_days": 7})
    call(stack, f"/v1/keys/{name}", {"deletion_protection": False}, method="PATCH")
    scheduled = lifecycle(stack, name, "schedule-destruction", {"pending_days": 7})
    in_window = encrypt(stack, name, b"x", CONTEXT)

    async def after_window() -> None:
        later = datetime.now(UTC) + timedelta(days=7, seconds=1)
        async with key_service(stack, lambda: later) as service:
            await service.destroy_if_due(name)

    run(after_window())
    shown = call(stack, f"/v1/keys/{name}")

    assert protected.status == 409
    assert "deletion protection" in protected.json()["detail"]
    assert (scheduled.status, scheduled.json()["state"]) == (200, "pending-destruction")
    assert in_window.status == 409
    assert shown.json()["state"] == "destroyed"
    if backend == "vault":
        assert transit_key_status(stack, name) == 404
    elif backend == "kms":
        assert set(kms_states(stack, materials)) == {"PendingDeletion"}
    else:
        assert hsm_objects_with_label(stack, name) == 0


def test_destruction_not_done_before_the_window_ends(stack: DevStack, backend: str) -> None:
    """A day short of the window the scheduler leaves the key and its material alone."""
    name = create_key(stack, backend, deletion_protection=False)
    lifecycle(stack, name, "schedule-destruction", {"pending_days": 7})

    async def too_early() -> object:
        earlier = datetime.now(UTC) + timedelta(days=6)
        async with key_service(stack, lambda: earlier) as service:
            return await service.destroy_if_due(name)

    result = run(too_early())
    cancelled = lifecycle(stack, name, "cancel-destruction")

    assert result is None
    assert (cancelled.status, cancelled.json()["state"]) == (200, "suspended")
    if backend == "hsm":
        assert hsm_objects_with_label(stack, name) == 1


def test_datakey_plaintext_matches_its_ciphertext(stack: DevStack, backend: str) -> None:
    """The data key's plaintext is what its own ciphertext decrypts to; without plaintext on request."""
    name = create_key(stack, backend)

    reply = call(stack, f"/v1/keys/{name}/datakey", {"bytes": 32, "context": CONTEXT})
    opened = decrypt(stack, name, reply.json()["ciphertext"], CONTEXT)
    wrapped_only = call(stack, f"/v1/keys/{name}/datakey", {"include_plaintext": False})

    assert reply.status == 200
    assert len(unb64(reply.json()["plaintext"])) == 32
    assert opened.json()["plaintext"] == reply.json()["plaintext"]
    assert "plaintext" not in wrapped_only.json()
    assert wrapped_only.json()["ciphertext"].startswith(f"kb1:{name}:1:")


@pytest.mark.parametrize("context", [CONTEXT, {}], ids=["with-context", "no-context"])
def test_rewrap_moves_to_latest_version(stack: DevStack, backend: str, context: dict[str, str]) -> None:
    """Rewrap on the same key lands on the latest version and keeps the plaintext."""
    name = create_key(stack, backend)
    old = _sealed(stack, name, b"keep me", context)
    lifecycle(stack, name, "rotate")

    rewrapped = call(stack, f"/v1/keys/{name}/rewrap", {"ciphertext": old, "context": context})
    opened = decrypt(stack, name, rewrapped.json()["ciphertext"], context)

    assert rewrapped.json()["key_version"] == 2
    assert rewrapped.json()["ciphertext"].startswith(f"kb1:{name}:2:")
    assert unb64(opened.json()["plaintext"]) == b"keep me"


def test_sign_and_verify(stack: DevStack, backend: str) -> None:
    """An ECDSA P-256 key signs; the signature verifies, and fails for another message."""
    name = create_key(stack, backend, type_="ecdsa-p256")

    signed = call(stack, f"/v1/keys/{name}/sign", {"message": b64(b"approve payment 42")})
    signature = signed.json()["signature"]
    good = call(
        stack, f"/v1/keys/{name}/verify", {"message": b64(b"approve payment 42"), "signature": signature}
    )
    bad = call(
        stack, f"/v1/keys/{name}/verify", {"message": b64(b"approve payment 43"), "signature": signature}
    )
    encrypt_attempt = encrypt(stack, name, b"x")

    assert signed.status == 200, signed.body
    assert signature.startswith(f"kb1:{name}:1:")
    assert good.json() == {"valid": True}
    assert bad.json() == {"valid": False}
    assert encrypt_attempt.status == 400
    assert encrypt_attempt.json()["code"] == "unsupported_operation"


def test_batch_answers_per_item(stack: DevStack, backend: str) -> None:
    """A batch encrypts and decrypts each item; a bad item gets its own error and the rest succeed."""
    name = create_key(stack, backend)

    sealed = call(
        stack,
        f"/v1/keys/{name}/encrypt",
        {
            "batch": [
                {"plaintext": b64(b"one"), "context": CONTEXT},
                {"plaintext": "***"},
                {"plaintext": b64(b"three")},
            ]
        },
    )
    items = sealed.json()["batch"]
    opened = call(
        stack,
        f"/v1/keys/{name}/decrypt",
        {
            "batch": [
                {"ciphertext": items[0]["ciphertext"], "context": CONTEXT},
                {"ciphertext": items[2]["ciphertext"], "context": CONTEXT},
                {"ciphertext": "kb1:garbage"},
                {"ciphertext": items[2]["ciphertext"]},
            ]
        },
    )
    results = opened.json()["batch"]

    assert sealed.status == 200
    assert items[1]["error"]["code"] == "bad_request"
    assert opened.status == 200
    assert unb64(results[0]["plaintext"]) == b"one"
    assert [r.get("error", {}).get("code") for r in results[1:3]] == ["decryption_failed"] * 2
    assert unb64(results[3]["plaintext"]) == b"three"
    if backend == "vault":  # one transit call with batch_input, seen in Vault's own audit log
        audit = stack.layout.vault_audit_log.read_text()
        assert any(
            f"kb-transit/encrypt/{name}" in line and "batch_input" in line for line in audit.splitlines()
        )


@pytest.mark.parametrize(("source", "target"), [("vault", "hsm"), ("kms", "vault"), ("hsm", "kms")])
def test_rewrap_across_backends(stack: DevStack, source: str, target: str) -> None:
    """Rewrap to a key on another backend: the target decrypts the same plaintext."""
    src, dst = create_key(stack, source), create_key(stack, target)
    ciphertext = _sealed(stack, src, b"cross-backend secret", CONTEXT)

    moved = call(
        stack, f"/v1/keys/{src}/rewrap", {"ciphertext": ciphertext, "context": CONTEXT, "to_key": dst}
    )
    opened = decrypt(stack, dst, moved.json()["ciphertext"], CONTEXT)

    assert moved.status == 200, moved.body
    assert moved.json()["ciphertext"].startswith(f"kb1:{dst}:1:")
    assert unb64(opened.json()["plaintext"]) == b"cross-backend secret"


def test_oversized_plaintext_is_413_with_an_envelope_hint(stack: DevStack) -> None:
    """4096 bytes encrypt; 4097 bytes is 413 pointing at datakey/envelope encryption."""
    name = create_key(stack, "vault")

    at_limit = encrypt(stack, name, b"x" * 4096)
    over = encrypt(stack, name, b"x" * 4097)

    assert at_limit.status == 200
    assert over.status == 413
    assert "datakey" in over.json()["detail"]
