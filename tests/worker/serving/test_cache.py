"""The tail tier's cache policy and the offline references the benchmark compares it with."""

from __future__ import annotations

import functools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from worker.serving.cache import FrequencyCache, LRUCache, belady_hits, replay

keys = st.sampled_from([f"m{i}" for i in range(6)])
traces = st.lists(keys, max_size=60)
MB = 1_000_000


def held_bytes(held: set[str], sizes: dict[str, int], bases: dict[str, tuple[str, int]]) -> int:
    """What ``held`` takes: each key's own bytes and each base its keys use, once."""
    shared = {bases[k] for k in held if bases.get(k, ("", 0))[0]}
    return sum(sizes[k] for k in held) + sum(size for _base, size in shared)


@settings(max_examples=200, deadline=None)
@given(
    trace=traces,
    sizes=st.dictionaries(keys, st.integers(1, 40), min_size=6),
    budget=st.integers(1, 100),
)
def test_policies_never_hold_more_than_the_budget(
    trace: list[str], sizes: dict[str, int], budget: int
) -> None:
    for policy in (LRUCache(budget), FrequencyCache(budget, window_fraction=0.1)):
        held: set[str] = set()
        for key in trace:
            hit = policy.lookup(key)
            assert hit == (key in held)
            if not hit:
                kept, evicted = policy.admit(key, sizes[key])
                assert key not in evicted and set(evicted) <= held
                held -= set(evicted)
                if kept:
                    held.add(key)
                else:
                    assert sizes[key] > budget or isinstance(policy, FrequencyCache)
            assert set(policy.held()) == held
            assert sum(sizes[k] for k in held) <= budget


def brute_force_optimum(trace: tuple[str, ...], capacity: int) -> int:
    """Most hits any offline policy gets with room for ``capacity`` unit-size items."""

    @functools.cache
    def best(position: int, held: frozenset[str]) -> int:
        if position == len(trace):
            return 0
        key = trace[position]
        if key in held:
            return 1 + best(position + 1, held)
        options = [best(position + 1, held)]  # do not keep it
        if len(held) < capacity:
            options.append(best(position + 1, held | {key}))
        else:
            options += [best(position + 1, (held - {victim}) | {key}) for victim in held]
        return max(options)

    return best(0, frozenset())


@settings(max_examples=200, deadline=None)
@given(trace=st.lists(keys, max_size=14), capacity=st.integers(1, 3))
def test_belady_is_the_offline_optimum(trace: list[str], capacity: int) -> None:
    assert belady_hits(trace, capacity) == brute_force_optimum(tuple(trace), capacity)


@settings(max_examples=100, deadline=None)
@given(trace=traces, capacity=st.integers(1, 4))
def test_no_policy_beats_belady(trace: list[str], capacity: int) -> None:
    sizes = dict.fromkeys(trace, 1)
    optimum = belady_hits(trace, capacity)
    assert replay(LRUCache(capacity), trace, sizes)[0] <= optimum
    assert replay(FrequencyCache(capacity), trace, sizes)[0] <= optimum


def test_a_scan_of_cold_models_does_not_flush_the_hot_ones() -> None:
    hot = [f"hot{i}" for i in range(8)]
    warm_up = hot * 20
    scan = [f"cold{i}" for i in range(200)]
    trace = [*warm_up, *scan, *hot]
    sizes = dict.fromkeys(trace, 1)
    frequency, lru = FrequencyCache(10, window_fraction=0.1), LRUCache(10)
    replay(frequency, [*warm_up, *scan], sizes)
    replay(lru, [*warm_up, *scan], sizes)
    assert all(frequency.lookup(k) for k in hot)
    assert not any(lru.lookup(k) for k in hot)


def test_aging_lets_a_new_favourite_in() -> None:
    rng = random.Random(0)
    old = [f"old{i}" for i in range(5)]
    new = [f"new{i}" for i in range(5)]
    cache = FrequencyCache(5, window_fraction=0.2, aging_factor=10)
    sizes = dict.fromkeys(old + new, 1)
    replay(cache, [rng.choice(old) for _ in range(5000)], sizes)
    assert set(cache.held()) == set(old)
    replay(cache, [rng.choice(new) for _ in range(2000)], sizes)
    assert len(set(cache.held()) & set(new)) >= 4


def test_models_bigger_than_the_budget_are_never_kept() -> None:
    for policy in (LRUCache(10), FrequencyCache(10)):
        assert policy.admit("big", 11) == (False, [])
        assert policy.held() == []


def test_removed_models_are_forgotten() -> None:
    cache = FrequencyCache(3, window_fraction=0.34)
    for key in ["a", "b", "c", "a", "a"]:
        if not cache.lookup(key):
            cache.admit(key, 1)
    cache.remove("a")
    assert "a" not in cache.held() and cache.frequency("a") == 0
    assert cache.used == len(cache.held())


@settings(max_examples=300, deadline=None)
@given(
    trace=traces,
    sizes=st.dictionaries(keys, st.integers(1, 30), min_size=6),
    base_of=st.dictionaries(keys, st.sampled_from(["", "B", "B", "C"]), min_size=6),
    base_sizes=st.fixed_dictionaries({"B": st.integers(0, 60), "C": st.integers(0, 30)}),
    budget=st.integers(1, 100),
    removals=st.sets(st.integers(0, 59), max_size=5),
)
def test_a_base_is_charged_once_while_a_held_key_uses_it(
    trace: list[str],
    sizes: dict[str, int],
    base_of: dict[str, str],
    base_sizes: dict[str, int],
    budget: int,
    removals: set[int],
) -> None:
    bases = {k: (b, base_sizes[b]) for k, b in base_of.items() if b}
    for policy in (LRUCache(budget), FrequencyCache(budget, window_fraction=0.1)):
        held: set[str] = set()
        for position, key in enumerate(trace):
            if position in removals:  # an undeploy
                policy.remove(key)
                held.discard(key)
            hit = policy.lookup(key)
            assert hit == (key in held)
            if not hit:
                base, base_size = bases.get(key, ("", 0))
                kept, evicted = policy.admit(key, sizes[key], base, base_size)
                assert key not in evicted and set(evicted) <= held
                held -= set(evicted)
                if kept:
                    held.add(key)
                elif isinstance(policy, LRUCache):
                    assert sizes[key] + base_size > budget
            assert set(policy.held()) == held
            assert policy.used == held_bytes(held, sizes, bases) <= budget


def test_a_thousand_adapters_on_one_base_fit_where_copies_would_not() -> None:
    adapters = [f"t{i:04d}" for i in range(1000)]
    sizes = dict.fromkeys(adapters, 400_000)
    bases = dict.fromkeys(adapters, ("minilm", 90 * MB))
    for policy in (LRUCache(512 * MB), FrequencyCache(512 * MB)):
        assert replay(policy, adapters, sizes, bases) == (0, 1000)
        assert len(policy.held()) == 1000 and policy.used == 490 * MB
        assert replay(policy, adapters, sizes, bases) == (1000, 1000)
    copies = LRUCache(512 * MB)
    replay(copies, adapters, dict.fromkeys(adapters, 90 * MB + 400_000))
    assert len(copies.held()) == 5


def test_the_base_is_released_with_its_last_user() -> None:
    for policy in (LRUCache(100), FrequencyCache(100, window_fraction=0.2)):
        assert policy.admit("a", 10, "B", 50) == (True, [])
        assert policy.admit("b", 10, "B", 50) == (True, [])
        assert policy.used == 70
        policy.remove("a")
        assert policy.used == 60
        policy.remove("b")
        assert policy.used == 0 and policy.held() == []
    lru = LRUCache(100)
    for key in ("a", "b"):
        lru.admit(key, 10, "B", 50)
    assert lru.admit("c", 40) == (True, ["a"])  # a's bytes are enough; B stays for b
    assert lru.used == 100
    assert lru.admit("d", 10) == (True, ["b"])  # b goes, and B with it
    assert lru.used == 50


def test_a_key_on_a_base_too_big_for_the_budget_is_never_kept() -> None:
    for policy in (LRUCache(100), FrequencyCache(100)):
        assert policy.admit("a", 11, "B", 90) == (False, [])
        assert policy.held() == [] and policy.used == 0


def test_a_scan_of_cold_adapters_on_a_new_base_does_not_flush_the_hot_models() -> None:
    hot = [f"hot{i}" for i in range(8)]
    scan = [f"cold{i}" for i in range(200)]
    sizes = {**dict.fromkeys(hot, 10), **dict.fromkeys(scan, 1)}
    bases = dict.fromkeys(scan, ("new-base", 30))
    cache = FrequencyCache(100, window_fraction=0.1)
    replay(cache, hot * 20, sizes, bases)
    replay(cache, scan, sizes, bases)
    assert all(cache.lookup(k) for k in hot)
    assert cache.used <= 100
    # A popular adapter of that base wins its base's room once asked for more than them.
    replay(cache, ["cold0"] * 30, sizes, bases)
    assert "cold0" in cache.held() and cache.used == held_bytes(set(cache.held()), sizes, bases)
