"""pushlib.ttlcache: the per-worker cache of Redis answers."""

from __future__ import annotations

import pytest

from pushlib.ttlcache import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Loader:
    def __init__(self, *values: str | None) -> None:
        self.values = list(values)
        self.calls = 0

    def __call__(self) -> str | None:
        self.calls += 1
        return self.values.pop(0)


def test_fresh_for_ttl_then_loaded_again() -> None:
    clock = Clock()
    cache: TtlCache[str, str | None] = TtlCache(5.0, 10, clock=clock)
    load = Loader("a", "b")
    assert cache.get_or_load("k", load) == "a"
    clock.now += 4.9
    assert cache.get_or_load("k", load) == "a" and load.calls == 1
    clock.now += 0.1  # exactly ttl later: expired
    assert cache.get_or_load("k", load) == "b" and load.calls == 2


def test_none_is_an_answer_worth_caching() -> None:
    cache: TtlCache[str, str | None] = TtlCache(5.0, 10, clock=Clock())
    load = Loader(None)
    assert cache.get_or_load("eve", load) is None
    assert cache.get_or_load("eve", load) is None and load.calls == 1
    assert cache.get("eve", "missing") is None and cache.get("bob", "missing") == "missing"


def test_a_failed_load_stores_nothing_and_keeps_the_stale_value() -> None:
    clock = Clock()
    cache: TtlCache[str, list[str]] = TtlCache(10.0, 1, clock=clock)
    cache.put("ua", ["m1"])
    clock.now += 11

    def down() -> list[str]:
        raise ConnectionError("redis down")

    with pytest.raises(ConnectionError):
        cache.get_or_load("ua", down)
    assert cache.get("ua", []) == [] and cache.get("ua", [], stale_ok=True) == ["m1"]
    assert cache.get_or_load("ua", lambda: ["m2"]) == ["m2"]


def test_size_bound_drops_the_oldest_first() -> None:
    clock = Clock()
    cache: TtlCache[int, int] = TtlCache(60.0, 3, clock=clock)
    for i in range(5):
        cache.put(i, i)
        clock.now += 1
    assert len(cache) == 3 and [cache.get(i, -1) for i in range(5)] == [-1, -1, 2, 3, 4]
    cache.put(2, 20)  # a refreshed key is the newest again
    cache.put(5, 5)
    assert [cache.get(i, -1) for i in range(6)] == [-1, -1, 20, -1, 4, 5]


def test_expired_entries_leave_as_new_ones_come() -> None:
    clock = Clock()
    cache: TtlCache[int, int] = TtlCache(5.0, 100, clock=clock)
    for i in range(10):
        cache.put(i, i)
    clock.now += 6
    cache.put(99, 99)
    assert len(cache) == 1


@pytest.mark.parametrize(("ttl", "size"), [(0.0, 1), (-1.0, 1), (float("nan"), 1), (1.0, 0)])
def test_nonsense_bounds_are_refused(ttl: float, size: int) -> None:
    with pytest.raises(ValueError):
        TtlCache(ttl, size)
