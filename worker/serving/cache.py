"""The long-tail tier's cache policy, and the references it is measured against.

Pure Python (no Ray, no torch): a tail replica consults a :class:`FrequencyCache` to decide
which loaded models to keep within its memory budget, and the cache benchmark replays a
request trace through the same class, so the figures describe the code that serves.

Why not plain LRU (what Ray Serve's ``@serve.multiplexed`` does): tenant traffic is skewed
and stable (a few tenants make most requests), and one scan over many cold tenants flushes
every hot model out of an LRU. :class:`FrequencyCache` is a W-TinyLFU in miniature:

- a small LRU *window* (1 % of the budget) takes every newly loaded model, so a model that
  is suddenly popular gets a chance to prove it;
- the *main* region keeps models by how often they were asked for recently: a model leaving
  the window enters main only if it was asked for more often than the main models it would
  displace (the least frequent first, the least recent among equals); otherwise it is
  dropped;
- counts are halved every ``300 x (models held)`` requests (aging), so yesterday's hot
  tenant does not squat forever. (TinyLFU halves after 10x; a tail model gets few
  requests, and over so short a period its count is mostly noise: on the benchmark's Zipf
  trace 10x costs ~1.5 points of hit ratio, 300x is within 0.3 of an oracle that knows
  the true popularity.)

Sizes are bytes (each model's measured footprint); a model bigger than the budget is never
kept. Counts are exact per model id: a tail pool knows every model it may be asked for.

Adapters on a shared base: ``admit(key, size, base, base_size)`` names the base a key needs
resident (its sha256) and its bytes, which are charged once while at least one held key
uses it and released when the last one goes; ``size`` is then only the adapter's own bytes.
In :class:`FrequencyCache` a base's bytes count against the main region wherever its
adapters are (window or main): a key whose base is not held yet must win room for the base
there by the same frequency rule as a model of that size entering main, so a scan over cold
adapters of a new base does not flush the hot models either. A key that needs its base and
itself to be more than the budget is never kept.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol


class CachePolicy(Protocol):
    """What a tail replica asks of its policy."""

    def lookup(self, key: str) -> bool:
        """Record a request for ``key``; True if it is held."""
        ...

    def admit(
        self, key: str, size: int, base: str = "", base_size: int = 0
    ) -> tuple[bool, list[str]]:
        """After a miss (``key`` was just loaded, ``size`` bytes on the shared ``base`` of
        ``base_size`` bytes, or "" for none): (keep it?, keys to unload)."""
        ...

    def remove(self, key: str) -> None:
        """Forget ``key`` (its model was undeployed)."""
        ...

    def held(self) -> list[str]: ...


class BaseCharges:
    """The bases the held keys use, each charged once while at least one of them does."""

    def __init__(self) -> None:
        self.of: dict[str, str] = {}  # held key -> its base
        self.sizes: dict[str, int] = {}  # held base -> its bytes (as its first user said)
        self.users: dict[str, int] = {}  # held base -> how many held keys use it

    def due(self, base: str, base_size: int) -> int:
        """The bytes a key on ``base`` would add beyond its own: the base's, if not held."""
        return base_size if base and base not in self.users else 0

    def hold(self, key: str, base: str, base_size: int) -> int:
        """``key`` (held now) uses ``base``: the bytes newly charged."""
        if not base:
            return 0
        added = self.due(base, base_size)
        self.of[key] = base
        self.users[base] = self.users.get(base, 0) + 1
        self.sizes.setdefault(base, base_size)
        return added

    def release(self, key: str) -> int:
        """``key`` is no longer held: the bytes freed (its base's, if it was the last)."""
        base = self.of.pop(key, "")
        if not base:
            return 0
        self.users[base] -= 1
        if self.users[base]:
            return 0
        del self.users[base]
        return self.sizes.pop(base)


class LRUCache:
    """Least recently used, by bytes: the reference (and Ray Serve multiplexing's policy)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0  # bases included
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.bases = BaseCharges()

    def lookup(self, key: str) -> bool:
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        return False

    def admit(
        self, key: str, size: int, base: str = "", base_size: int = 0
    ) -> tuple[bool, list[str]]:
        if size + (base_size if base else 0) > self.budget:
            return False, []
        evicted: list[str] = []
        # Evicting the last other user of ``base`` makes the base's bytes due again: the
        # room needed is re-read after every eviction.
        while self.used + size + self.bases.due(base, base_size) > self.budget:
            victim, victim_size = self.entries.popitem(last=False)
            self.used -= victim_size + self.bases.release(victim)
            evicted.append(victim)
        self.entries[key] = size
        self.used += size + self.bases.hold(key, base, base_size)
        return True, evicted

    def remove(self, key: str) -> None:
        if key in self.entries:
            self.used -= self.entries.pop(key) + self.bases.release(key)

    def held(self) -> list[str]:
        return list(self.entries)


class FrequencyCache:
    """W-TinyLFU in miniature (see the module docstring)."""

    def __init__(
        self, budget_bytes: int, *, window_fraction: float = 0.01, aging_factor: int = 300
    ) -> None:
        self.budget = budget_bytes
        self.window_budget = max(0, int(budget_bytes * window_fraction))
        self.aging_factor = aging_factor
        self.window: OrderedDict[str, int] = OrderedDict()  # LRU order
        self.main: OrderedDict[str, int] = OrderedDict()  # LRU order (ties among equals)
        self.window_used = 0
        self.main_used = 0  # the main models' bytes and every held base's
        self.bases = BaseCharges()
        self.counts: dict[str, int] = {}
        self.requests_since_aging = 0

    # -- frequency ----------------------------------------------------------------------

    def _touch(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1
        self.requests_since_aging += 1
        held = len(self.window) + len(self.main)
        if self.requests_since_aging >= self.aging_factor * max(held, 16):
            self.requests_since_aging = 0
            self.counts = {k: c // 2 for k, c in self.counts.items() if c > 1}

    def frequency(self, key: str) -> int:
        return self.counts.get(key, 0)

    # -- the policy ---------------------------------------------------------------------

    def lookup(self, key: str) -> bool:
        self._touch(key)
        if key in self.window:
            self.window.move_to_end(key)
            return True
        if key in self.main:
            self.main.move_to_end(key)
            return True
        return False

    def admit(
        self, key: str, size: int, base: str = "", base_size: int = 0
    ) -> tuple[bool, list[str]]:
        base_size = base_size if base else 0
        if size + base_size > self.budget or key in self.window or key in self.main:
            return False, []
        evicted: list[str] = []
        # A base not held yet lives in main: room for it there, or the key is not kept.
        due = self.bases.due(base, base_size)
        if due and not self._make_room(key, due, evicted):
            return False, []  # (nothing was evicted)
        self.main_used += self.bases.hold(key, base, base_size)
        self.window[key] = size
        self.window_used += size
        # Models leave the window oldest first and try to enter main.
        while self.window_used > self.window_budget and self.window:
            candidate, candidate_size = self.window.popitem(last=False)
            self.window_used -= candidate_size
            if not self._enter_main(candidate, candidate_size, evicted):
                self.main_used -= self.bases.release(candidate)
                evicted.append(candidate)
        # ``key`` itself may have been dropped right away: that is "not kept", not an unload.
        return key in self.window or key in self.main, [k for k in evicted if k != key]

    def _enter_main(self, candidate: str, size: int, evicted: list[str]) -> bool:
        if not self._make_room(candidate, size, evicted):
            return False
        self.main[candidate] = size
        self.main_used += size
        return True

    def _make_room(self, candidate: str, size: int, evicted: list[str]) -> bool:
        """Room for ``size`` more bytes in main, evicting main models only if ``candidate``
        was asked for more often than each of them; False (nothing evicted) if not."""
        main_budget = self.budget - self.window_budget
        if size > main_budget:
            return False
        need = self.main_used + size - main_budget
        if need > 0:
            victims = self._victims(need)
            if victims is None or self.frequency(candidate) <= max(
                self.frequency(v) for v in victims
            ):
                return False
            for victim in victims:
                self.main_used -= self.main.pop(victim) + self.bases.release(victim)
                evicted.append(victim)
        return True

    def _victims(self, need: int) -> list[str] | None:
        """The least frequent main models (least recent among equals) freeing ``need``
        (their own bytes and the bases only they use); None if all of main cannot (bases
        that window models use stay)."""
        order = {key: position for position, key in enumerate(self.main)}
        ranked = sorted(self.main, key=lambda k: (self.frequency(k), order[k]))
        users = dict(self.bases.users)  # what is left of each base's users as victims go
        victims: list[str] = []
        freed = 0
        for key in ranked:
            if freed >= need:
                break
            victims.append(key)
            freed += self.main[key]
            base = self.bases.of.get(key)
            if base:
                users[base] -= 1
                if not users[base]:
                    freed += self.bases.sizes[base]
        return victims if freed >= need else None

    def remove(self, key: str) -> None:
        if key in self.window:
            self.window_used -= self.window.pop(key)
            self.main_used -= self.bases.release(key)
        if key in self.main:
            self.main_used -= self.main.pop(key) + self.bases.release(key)
        self.counts.pop(key, None)

    def held(self) -> list[str]:
        return [*self.window, *self.main]

    @property
    def used(self) -> int:
        return self.window_used + self.main_used


# --- offline references ----------------------------------------------------------------


def replay(
    policy: CachePolicy,
    trace: Iterable[str],
    sizes: Mapping[str, int],
    bases: Mapping[str, tuple[str, int]] | None = None,
) -> tuple[int, int]:
    """(hits, requests) of ``policy`` serving ``trace``; ``bases``: key -> (its shared base,
    the base's bytes) for the adapters among them."""
    hits = requests = 0
    for key in trace:
        requests += 1
        if policy.lookup(key):
            hits += 1
        else:
            policy.admit(key, sizes[key], *(bases or {}).get(key, ("", 0)))
    return hits, requests


def belady_hits(trace: Sequence[str], capacity: int) -> int:
    """Hits of Belady's optimum (MIN) on ``trace`` with room for ``capacity`` equal-sized
    items, bypass allowed: on a miss, of the held items and the new one, the one asked
    for again furthest in the future (or never) is not kept. Optimal for unit sizes."""
    never = len(trace)
    next_use = [never] * len(trace)
    last_seen: dict[str, int] = {}
    for position in range(len(trace) - 1, -1, -1):
        next_use[position] = last_seen.get(trace[position], never)
        last_seen[trace[position]] = position
    held: dict[str, int] = {}  # key -> its next use
    heap: list[tuple[int, str]] = []  # (-next use, key), stale entries skipped
    hits = 0
    for position, key in enumerate(trace):
        upcoming = next_use[position]
        if key in held:
            hits += 1
        elif len(held) >= capacity:
            # Drop the furthest-next-use item among the held ones and the newcomer.
            while True:
                negative, victim = heap[0]
                if held.get(victim) == -negative:
                    break
                heapq.heappop(heap)
            if -negative <= upcoming:
                continue  # the newcomer is needed last: do not keep it
            heapq.heappop(heap)
            del held[victim]
        if capacity > 0:
            held[key] = upcoming
            heapq.heappush(heap, (-upcoming, key))
    return hits
