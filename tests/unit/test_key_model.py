"""The key state machine and ciphertext envelope: pure logic, no backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.backends.base import canonical_context
from broker.errors import BadRequest, Conflict, DecryptionFailed, UnsupportedOperation
from broker.keys import ciphertext
from broker.keys.model import Key, Op, State, Version
from broker.vocab import Backend, KeyType

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def active_key(**changes: object) -> Key:
    base = Key(
        name="k",
        backend=Backend.VAULT,
        type=KeyType.AES256_GCM,
        environment="dev",
        state=State.PRE_ACTIVE,
        created_at=T0,
        updated_at=T0,
    ).activated(Version(1, "m1", T0), T0)
    from dataclasses import replace

    return replace(base, **changes)  # type: ignore[arg-type]


ALL_OPS = [Op.ENCRYPT, Op.DECRYPT, Op.DATAKEY, Op.REWRAP_FROM]
ALLOWED = {
    State.ACTIVE: {Op.ENCRYPT, Op.DECRYPT, Op.DATAKEY, Op.REWRAP_FROM},
    State.SUSPENDED: set(),
    State.DEACTIVATED: {Op.DECRYPT, Op.REWRAP_FROM},
    State.COMPROMISED: set(),
    State.PENDING_DESTRUCTION: set(),
    State.DESTROYED: set(),
    State.PRE_ACTIVE: set(),
}


@pytest.mark.parametrize("state", list(State))
def test_state_permits_exactly_its_operations(state: State) -> None:
    """Each state allows the operations of ARCHITECTURE.md and refuses the rest with 409."""
    key = active_key(state=state)
    allowed = set()
    for op in ALL_OPS:
        try:
            key.check_usable(op)
            allowed.add(op)
        except Conflict:
            pass

    assert allowed == ALLOWED[state]


def test_compromised_key_allows_only_administrator_rewrap_away() -> None:
    """Compromised: decrypt refused, rewrap-from allowed only with the admin flag."""
    key = active_key(state=State.COMPROMISED)

    key.check_usable(Op.REWRAP_FROM, admin_rewrap=True)
    with pytest.raises(Conflict):
        key.check_usable(Op.REWRAP_FROM)
    with pytest.raises(Conflict):
        key.check_usable(Op.DECRYPT)


def test_min_decrypt_version_retires_older_versions() -> None:
    """Versions under min_decrypt_version are refused for decrypt; newer ones pass."""
    key = active_key().with_version("m2", T0).patched({"min_decrypt_version": 2}, T0)

    key.check_usable(Op.DECRYPT, version=2)
    with pytest.raises(Conflict, match="retired"):
        key.check_usable(Op.DECRYPT, version=1)


def test_signing_key_cannot_encrypt() -> None:
    """An ECDSA key refuses encryption as unsupported (400), not as a state conflict."""
    key = active_key(type=KeyType.ECDSA_P256)

    with pytest.raises(UnsupportedOperation):
        key.check_usable(Op.ENCRYPT)
    key.check_usable(Op.SIGN)


def test_transitions_follow_the_diagram() -> None:
    """suspend/resume, revoke, schedule/cancel, destroy: allowed paths succeed, others 409."""
    key = active_key(deletion_protection=False)

    suspended = key.suspended(T0)
    assert suspended.resumed(T0).state is State.ACTIVE
    assert key.revoked("retired", T0).state is State.DEACTIVATED
    assert key.revoked("compromised", T0).state is State.COMPROMISED
    with pytest.raises(Conflict):
        key.resumed(T0)
    with pytest.raises(Conflict):
        key.revoked("compromised", T0).revoked("retired", T0)
    with pytest.raises(BadRequest):
        key.revoked("bored", T0)
    pending = suspended.destruction_scheduled(7, T0)
    assert pending.destroy_after == T0 + timedelta(days=7)
    assert pending.destruction_cancelled(T0).state is State.SUSPENDED
    assert pending.destroyed(T0).state is State.DESTROYED


def test_cancel_never_revives_a_revoked_key() -> None:
    """A compromised key scheduled for destruction and cancelled stays compromised."""
    key = active_key(deletion_protection=False).revoked("compromised", T0)

    back = key.destruction_scheduled(10, T0).destruction_cancelled(T0)

    assert back.state is State.COMPROMISED


@pytest.mark.parametrize("days", [0, 6, 31])
def test_pending_window_is_7_to_30_days(days: int) -> None:
    """Windows outside 7..30 days are bad input."""
    with pytest.raises(BadRequest, match=r"7\.\.30"):
        active_key(deletion_protection=False).destruction_scheduled(days, T0)


def test_deletion_protection_refuses_scheduling() -> None:
    """Protection on: 409 with a hint how to turn it off."""
    with pytest.raises(Conflict, match="deletion protection"):
        active_key().destruction_scheduled(7, T0)


def test_rotation_and_destruction_due_follow_the_clock() -> None:
    """Due exactly when the period or window has passed, not a second before."""
    key = active_key(rotation_period_seconds=86400, deletion_protection=False)
    pending = key.destruction_scheduled(7, T0)

    assert (key.rotation_due(T0 + timedelta(seconds=86399)), key.rotation_due(T0 + timedelta(days=1))) == (
        False,
        True,
    )
    assert (
        pending.destruction_due(T0 + timedelta(days=7) - timedelta(seconds=1)),
        pending.destruction_due(T0 + timedelta(days=7)),
    ) == (False, True)


def test_storage_round_trip() -> None:
    """A key survives its JSON form unchanged."""
    key = active_key(tags={"team": "pay"}).with_version("m2", T0 + timedelta(hours=1))

    assert Key.from_json(key.to_json()) == key
    assert "material" not in str(key.public()["versions"])


def test_envelope_round_trip_and_rejects() -> None:
    """kb1 envelopes parse back; anything malformed is a bare decryption failure."""
    env = ciphertext.Envelope("payments", 3, b"\x00\xffpayload")

    assert ciphertext.decode(env.encode()) == env
    for bad in (
        "",
        "kb2:payments:3:AAAA",
        "kb1:payments:x:AAAA",
        "kb1::3:AAAA",
        "kb1:payments:3:",
        "kb1:a:1:!!!",
    ):
        with pytest.raises(DecryptionFailed) as info:
            ciphertext.decode(bad)
        assert info.value.detail == "Decryption failed"


def test_canonical_context_is_order_independent() -> None:
    """The AAD of a context does not depend on field order; empty context is empty AAD."""
    assert (
        canonical_context({"b": "2", "a": "1"})
        == canonical_context({"a": "1", "b": "2"})
        == b'{"a":"1","b":"2"}'
    )
    assert canonical_context({}) == b""
