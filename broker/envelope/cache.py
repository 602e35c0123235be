"""Data-key caching with the AWS Encryption SDK's limits: max age (required), max messages, max bytes.

Two sides, one policy:

- encrypt: a data key made for a list of keys and a context is reused for later messages with
  exactly that list and context (never another context) until a limit is reached;
- decrypt: a data key unwrapped from one wrapped key under one context is reused to open later
  messages carrying that wrapped key under that context.

An entry is wiped (its bytearray zeroed) when it is evicted for any reason; a lookup hands out
a fresh copy that the caller wipes after deriving its keys, so evicting an entry in use on
another thread never changes that thread's key. ``hits``/``misses`` are counted per side.

A cache belongs to ONE key source (one client identity): a decrypt-side hit skips the broker,
so sharing a cache between identities would let one open what only the other may.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from broker.envelope.format import ContextPairs

Clock = Callable[[], float]

# The Encryption SDK's ceilings for the optional limits.
MAX_MESSAGES_CEILING = 2**32
MAX_BYTES_CEILING = 2**63 - 1


def wipe(buffer: bytearray) -> None:
    buffer[:] = bytes(len(buffer))


@dataclass
class _Entry:
    data_key: bytearray
    wrapped: tuple[str, ...]
    created: float
    messages: int = 0
    bytes: int = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


@dataclass
class _Side:
    entries: OrderedDict[tuple[object, ...], _Entry] = field(default_factory=OrderedDict)
    stats: CacheStats = field(default_factory=CacheStats)


class DataKeyCache:
    """An in-memory, thread-safe, size-bounded cache of data keys; see the module docstring.

    ``max_age`` (seconds) is required; an entry is never used at or after that age, whatever
    else happened (a key revoked meanwhile is noticed at the latest then).
    """

    def __init__(
        self,
        max_age: float,
        *,
        max_messages: int = MAX_MESSAGES_CEILING,
        max_bytes: int = MAX_BYTES_CEILING,
        capacity: int = 1000,
        clock: Clock = time.monotonic,
    ) -> None:
        if not max_age > 0:
            raise ValueError("max_age must be a positive number of seconds")
        if not 1 <= max_messages <= MAX_MESSAGES_CEILING:
            raise ValueError(f"max_messages must be 1 to {MAX_MESSAGES_CEILING}")
        if not 0 <= max_bytes <= MAX_BYTES_CEILING:
            raise ValueError(f"max_bytes must be 0 to {MAX_BYTES_CEILING}")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.max_age, self.max_messages, self.max_bytes = float(max_age), max_messages, max_bytes
        self.capacity = capacity
        self._clock = clock
        self._lock = threading.Lock()
        self._encrypt = _Side()
        self._decrypt = _Side()

    @property
    def encrypt_stats(self) -> CacheStats:
        return self._encrypt.stats

    @property
    def decrypt_stats(self) -> CacheStats:
        return self._decrypt.stats

    def __len__(self) -> int:
        with self._lock:
            return len(self._encrypt.entries) + len(self._decrypt.entries)

    # -- encrypt side ---------------------------------------------------------------------

    def take_for_encrypt(
        self, keys: tuple[str, ...], context: ContextPairs, size: int
    ) -> tuple[bytearray, tuple[str, ...]] | None:
        """A copy of a cached data key and its wrappings for one message of ``size`` bytes, or None."""
        return self._take(self._encrypt, ("enc", keys, context), size)

    def put_for_encrypt(
        self,
        keys: tuple[str, ...],
        context: ContextPairs,
        data_key: bytes,
        wrapped: tuple[str, ...],
        size: int,
    ) -> None:
        """Cache a fresh data key whose first message (``size`` bytes) is already counted."""
        self._put(self._encrypt, ("enc", keys, context), data_key, wrapped, size)

    # -- decrypt side ---------------------------------------------------------------------

    def take_for_decrypt(self, wrapped: str, context: ContextPairs) -> bytearray | None:
        """A copy of the data key unwrapped earlier from ``wrapped`` under ``context``, or None."""
        found = self._take(self._decrypt, ("dec", wrapped, context), 0)
        return None if found is None else found[0]

    def put_for_decrypt(self, wrapped: str, context: ContextPairs, data_key: bytes) -> None:
        self._put(self._decrypt, ("dec", wrapped, context), data_key, (wrapped,), 0)

    def charge_decrypt(self, wrapped: str, context: ContextPairs, size: int) -> None:
        """Count the bytes a message opened with this entry held (known only once it is read)."""
        with self._lock:
            entry = self._decrypt.entries.get(("dec", wrapped, context))
            if entry is not None:
                entry.bytes += size

    # -- both -------------------------------------------------------------------------------

    def clear(self) -> None:
        """Wipe and drop every entry."""
        with self._lock:
            for side in (self._encrypt, self._decrypt):
                for entry in side.entries.values():
                    wipe(entry.data_key)
                    side.stats.evictions += 1
                side.entries.clear()

    def _usable(self, entry: _Entry, size: int) -> bool:
        return (
            self._clock() - entry.created < self.max_age
            and entry.messages < self.max_messages
            and entry.bytes + size <= self.max_bytes
        )

    def _take(
        self, side: _Side, cache_key: tuple[object, ...], size: int
    ) -> tuple[bytearray, tuple[str, ...]] | None:
        with self._lock:
            entry = side.entries.get(cache_key)
            if entry is not None and not self._usable(entry, size):
                self._evict(side, cache_key)
                entry = None
            if entry is None:
                side.stats.misses += 1
                return None
            entry.messages += 1
            entry.bytes += size
            side.entries.move_to_end(cache_key)
            side.stats.hits += 1
            return bytearray(entry.data_key), entry.wrapped

    def _put(
        self, side: _Side, cache_key: tuple[object, ...], data_key: bytes, wrapped: tuple[str, ...], size: int
    ) -> None:
        if size > self.max_bytes:
            return  # this one message already exceeds what a cached key may protect
        with self._lock:
            if cache_key in side.entries:
                self._evict(side, cache_key)
            side.entries[cache_key] = _Entry(bytearray(data_key), wrapped, self._clock(), 1, size)
            while len(side.entries) > self.capacity:
                self._evict(side, next(iter(side.entries)))

    def _evict(self, side: _Side, cache_key: tuple[object, ...]) -> None:
        entry = side.entries.pop(cache_key)
        wipe(entry.data_key)
        side.stats.evictions += 1
