"""A small per-process cache whose entries expire: what a Kamailio worker keeps of Redis answers
(HA1s, app states, UA mappings) so a burst of requests costs one lookup, while a change made in
Redis still applies within `ttl` seconds.

Not thread-safe: each Kamailio worker is its own single-threaded process.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """At most `max_size` entries, each fresh for `ttl` seconds after it was stored.

    Values may be None (a user without credentials is an answer worth caching too). Storing past
    `max_size` drops the oldest entries first; expired entries are dropped as new ones come in, or
    kept until then for `get(..., stale_ok=True)`.
    """

    def __init__(self, ttl: float, max_size: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl > 0 or max_size < 1:
            raise ValueError(f"TtlCache needs ttl > 0 and max_size >= 1, got {ttl!r}, {max_size!r}")
        self._ttl = ttl
        self._max_size = max_size
        self._clock = clock
        # oldest first: with one ttl and a monotonic clock, that is also soonest to expire
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K, default: V, *, stale_ok: bool = False) -> V:
        """The value stored for `key` if still fresh (or, with `stale_ok`, the last one stored
        while it is still held), else `default`."""
        item = self._items.get(key)
        if item is None or not (stale_ok or item[0] > self._clock()):
            return default
        return item[1]

    def put(self, key: K, value: V) -> None:
        now = self._clock()
        self._items.pop(key, None)
        self._items[key] = (now + self._ttl, value)
        while len(self._items) > self._max_size:
            self._items.popitem(last=False)
        while self._items:
            oldest = next(iter(self._items.values()))
            if oldest[0] > now:
                break
            self._items.popitem(last=False)

    def get_or_load(self, key: K, load: Callable[[], V]) -> V:
        """The fresh value for `key`, or `load()`'s, which is stored. When `load` raises, nothing is
        stored and the exception propagates (the last value stays available to `stale_ok`)."""
        item = self._items.get(key)
        if item is not None and item[0] > self._clock():
            return item[1]
        value = load()
        self.put(key, value)
        return value
