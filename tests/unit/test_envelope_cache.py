"""Data-key cache limits on an injected clock (max age, messages, bytes), never across contexts or
key lists, entries wiped on eviction, counters visible; and Envelope's use of it (fake key source)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

from broker.envelope import DataKeyCache, Envelope
from broker.envelope.format import ContextPairs
from broker.sdk.types import DataKey, Sealed

CTX: ContextPairs = (("tenant", "acme"),)
KEYS = ("k",)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeKeys:
    """A key source that 'wraps' by naming a stored key (enough to count calls; no crypto here)."""

    def __init__(self) -> None:
        self.store: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.calls = 0

    def generate_data_key(
        self, key: str, context: Mapping[str, str] | None = None, *, size: int = 32
    ) -> DataKey:
        self.calls += 1
        plaintext = os.urandom(size)
        text = f"kb1:{key}:1:{len(self.store):04d}"
        self.store[text] = (plaintext, dict(context or {}))
        return DataKey(plaintext, text, 1, key)

    def decrypt(self, key: str, ciphertext: str, context: Mapping[str, str] | None = None) -> bytes:
        self.calls += 1
        plaintext, sealed_under = self.store[ciphertext]
        if sealed_under != dict(context or {}):
            raise ValueError("decryption failed")
        return plaintext

    def rewrap(
        self,
        key: str,
        ciphertext: str,
        context: Mapping[str, str] | None = None,
        *,
        to_key: str | None = None,
    ) -> Sealed:
        raise NotImplementedError


def cache(clock: Clock, **kw: int) -> DataKeyCache:
    return DataKeyCache(60, clock=clock, **kw)


def test_max_age_is_required_and_positive() -> None:
    with pytest.raises(TypeError):
        DataKeyCache()  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="max_age"):
        DataKeyCache(0)


def test_an_entry_is_not_used_at_max_age_and_is_wiped() -> None:
    """Used up to just before max age; at max age it is evicted and its bytes zeroed."""
    clock = Clock()
    c = cache(clock)
    c.put_for_encrypt(KEYS, CTX, b"\x07" * 32, ("w",), 10)
    entry = c._encrypt.entries[("enc", KEYS, CTX)]
    clock.now += 59.9
    assert c.take_for_encrypt(KEYS, CTX, 10) == (bytearray(b"\x07" * 32), ("w",))
    clock.now += 0.1
    assert c.take_for_encrypt(KEYS, CTX, 10) is None
    assert entry.data_key == bytearray(32)
    assert (c.encrypt_stats.hits, c.encrypt_stats.misses, c.encrypt_stats.evictions) == (1, 1, 1)


def test_max_messages_counts_the_first_message() -> None:
    clock = Clock()
    c = cache(clock, max_messages=3)
    c.put_for_encrypt(KEYS, CTX, bytes(32), ("w",), 1)
    assert c.take_for_encrypt(KEYS, CTX, 1) is not None
    assert c.take_for_encrypt(KEYS, CTX, 1) is not None
    assert c.take_for_encrypt(KEYS, CTX, 1) is None


def test_max_bytes_refuses_a_message_that_would_exceed_it() -> None:
    clock = Clock()
    c = cache(clock, max_bytes=100)
    c.put_for_encrypt(KEYS, CTX, bytes(32), ("w",), 60)
    assert c.take_for_encrypt(KEYS, CTX, 41) is None  # 60 + 41 > 100
    c.put_for_encrypt(KEYS, CTX, bytes(32), ("w",), 60)
    assert c.take_for_encrypt(KEYS, CTX, 40) is not None  # exactly 100
    c.put_for_encrypt(("big",), CTX, bytes(32), ("w",), 101)  # one message already too big: not cached
    assert c.take_for_encrypt(("big",), CTX, 0) is None


def test_never_shared_across_contexts_or_key_lists() -> None:
    c = cache(Clock())
    c.put_for_encrypt(KEYS, CTX, bytes(32), ("w",), 1)
    assert c.take_for_encrypt(KEYS, (("tenant", "other"),), 1) is None
    assert c.take_for_encrypt(KEYS, (), 1) is None
    assert c.take_for_encrypt(("k", "escrow"), CTX, 1) is None
    assert c.take_for_encrypt(KEYS, CTX, 1) is not None


def test_a_taken_copy_survives_eviction() -> None:
    """The caller's copy is its own: evicting (wiping) the entry does not zero a key in use."""
    c = cache(Clock())
    c.put_for_encrypt(KEYS, CTX, b"\x05" * 32, ("w",), 1)
    taken = c.take_for_encrypt(KEYS, CTX, 1)
    c.clear()
    assert taken is not None
    assert taken[0] == bytearray(b"\x05" * 32)


def test_capacity_evicts_the_least_recently_used() -> None:
    c = DataKeyCache(60, capacity=2, clock=Clock())
    for name in ("a", "b", "c"):
        c.put_for_encrypt((name,), CTX, bytes(32), ("w",), 1)
    assert c.take_for_encrypt(("a",), CTX, 1) is None
    assert c.take_for_encrypt(("c",), CTX, 1) is not None


def test_decrypt_side_limits_and_byte_charging() -> None:
    clock = Clock()
    c = cache(clock, max_messages=2, max_bytes=50)
    c.put_for_decrypt("w", CTX, b"\x01" * 32)
    assert (
        c.take_for_decrypt(
            "w",
            (),
        )
        is None
    )  # another context
    c.charge_decrypt("w", CTX, 50)
    assert c.take_for_decrypt("w", CTX) is not None  # 50 bytes used: a message of unknown size may start
    assert c.take_for_decrypt("w", CTX) is None  # but two messages is the limit
    c.put_for_decrypt("w", CTX, b"\x01" * 32)
    c.charge_decrypt("w", CTX, 51)
    assert c.take_for_decrypt("w", CTX) is None  # over its byte budget


def test_envelope_uses_the_cache_on_both_sides_and_not_for_unknown_sizes() -> None:
    """Known-size messages share a data key up to max_messages; a stream of unknown size gets its own."""
    import io

    keys, clock = FakeKeys(), Clock()
    c = DataKeyCache(60, max_messages=10, clock=clock)
    env = Envelope(keys, cache=c)
    sealed = [env.encrypt_bytes("k", b"m%d" % i, {"tenant": "acme"}) for i in range(25)]
    assert keys.calls == 3
    assert round(c.encrypt_stats.hit_rate, 2) == 0.88
    env.encrypt("k", io.BytesIO(b"stream"), io.BytesIO(), {"tenant": "acme"})
    assert keys.calls == 4

    assert [env.decrypt_bytes(s, {"tenant": "acme"}) for s in sealed[:10]] == [b"m%d" % i for i in range(10)]
    assert keys.calls == 5  # one unwrap for the first ten (one data key)
    clock.now += 60
    env.decrypt_bytes(sealed[0], {"tenant": "acme"})
    assert keys.calls == 6


class _Answer(Exception):
    """An error with a status, as the SDK and the broker raise them."""

    def __init__(self, status: int) -> None:
        super().__init__(f"status {status}")
        self.status = status


class _OneKeyFails(FakeKeys):
    def __init__(self, failing: str, error: Exception) -> None:
        super().__init__()
        self.failing, self.error = failing, error

    def decrypt(self, key: str, ciphertext: str, context: Mapping[str, str] | None = None) -> bytes:
        if key == self.failing:
            raise self.error
        return super().decrypt(key, ciphertext, context)


def _two_key_message(keys: FakeKeys) -> bytes:
    first = keys.generate_data_key("a", dict(CTX))
    # The second wrapping of the same data key, as a broker rewrap would make it.
    second = f"kb1:b:1:{len(keys.store):04d}"
    keys.store[second] = (first.plaintext, dict(CTX))
    import io

    from broker.envelope.messages import seal_with_data_key

    out = io.BytesIO()
    seal_with_data_key(first.plaintext, [first.ciphertext, second], io.BytesIO(b"secret"), out, dict(CTX))
    return out.getvalue()


@pytest.mark.parametrize("status", [403, 404, 409, 400])
def test_a_key_the_broker_refuses_sends_decrypt_to_the_next_wrapping(status: int) -> None:
    """A 4xx about the first key (denied, gone, wrong state): the next wrapped key opens it."""
    keys = _OneKeyFails("a", _Answer(status))
    message = _two_key_message(keys)
    assert Envelope(keys).decrypt_bytes(message, dict(CTX)) == b"secret"


@pytest.mark.parametrize("error", [_Answer(0), _Answer(503), _Answer(429), TypeError("a bug")])
def test_no_answer_or_a_bug_is_not_reported_as_no_usable_key(error: Exception) -> None:
    """An unreachable broker, an outage, a rate limit or a bug propagates as itself: trying the
    other wrapped keys would not help, and 'no usable key' would send the operator the wrong way."""
    keys = _OneKeyFails("a", error)
    message = _two_key_message(keys)
    with pytest.raises(type(error)):
        Envelope(keys).decrypt_bytes(message, dict(CTX))
