"""Which replica set holds each pinned model: first-fit decreasing under a memory budget.

Pure (no Ray, no torch, no Django): the serving backend calls :func:`place` before it
changes anything, and the workbench may call it to preview a deployment.

A model may be an adapter on a shared base (``bases``: model id -> base key, with the base's
bytes in ``base_sizes``): a replica holds each base once for all the adapters on it, so a
set's bytes are its models' own sizes plus each distinct base of them once. A base is
counted again in every set that holds one of its adapters.

The rules, in order:

1. A model that with its base is bigger than one replica's budget, or pinned models that
   together exceed the pool's capacity (``max_sets * budget_bytes``; every base counted
   once), cannot be placed: :class:`InsufficientCapacity` ("need X, have Y") and nothing
   changes.
2. Models that stay keep their set (``previous``) unless their set no longer holds them (a
   model or base grew, the budget shrank, the pool lost sets): then the fewest models leave
   it, the largest first (fewest moves frees the most bytes; which of its bases the set
   keeps is chosen to keep the most models).
3. New and displaced models go first-fit decreasing into the sets' free space: largest
   first, where the adapters of one base go together, ordered by the base and all of its
   adapters' bytes (so they share as few copies of the base as possible); ties by id, so the
   result is deterministic. An adapter goes to the first set that already holds its base and
   has room for it, else the first with room for it and its base. Where that fails, an exact
   search over the same free space.
4. Failing that, every model of an overflowing set is free to go, the others stay.
5. Failing that, the whole pool is packed afresh (first-fit decreasing, then the exact
   search) and the new sets are numbered to keep as many models where they were as
   possible. Only if no packing is found is the placement refused.

So a model moves only when its set cannot hold it any more, or when no packing that keeps
every model of the sets that still fit exists.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from worker.serving.specs import InsufficientCapacity, ModelSpec, Placement

# The exact search (rule 4) gives up after this many steps: bin packing is NP-hard, and a
# pool first-fit decreasing cannot pack is rare and small in practice.
EXACT_SEARCH_STEPS = 200_000
# An overflowing set chooses which of its bases to keep by trying every subset of them up
# to this many bases (2**8 tries); beyond, smallest models first. A set holds one or two
# bases in practice.
EXACT_KEEP_BASES = 8


def place(
    models: Mapping[str, int],
    *,
    budget_bytes: int,
    max_sets: int,
    previous: Mapping[str, int] | None = None,
    bases: Mapping[str, str] | None = None,
    base_sizes: Mapping[str, int] | None = None,
) -> Placement:
    """Assign each model id (-> its ``memory_bytes``) to a set index in ``range(max_sets)``.

    ``bases`` maps an adapter's id to its base's key (absent or "" for a full model; ids not
    in ``models`` are ignored) and ``base_sizes`` each base key to its bytes. ``used_bytes``
    has one entry per set index (0 for an empty set), bases included; ``moved`` lists the
    models of ``previous`` whose set changed, sorted. Raises :class:`InsufficientCapacity`.
    """
    if budget_bytes <= 0 or max_sets <= 0:
        raise ValueError("budget_bytes and max_sets must be positive")
    for model_id, size in models.items():
        if size < 0:
            raise ValueError(f"model {model_id!r} has a negative size ({size})")
    sizes = _Sizes.of(models, bases or {}, base_sizes or {})
    need = sizes.used(models)
    have = budget_bytes * max_sets
    too_big = sorted(m for m in models if sizes.alone(m) > budget_bytes)
    if too_big:
        largest = max(sizes.alone(m) for m in too_big)
        raise InsufficientCapacity(
            need_bytes=largest,
            have_bytes=budget_bytes,
            detail=f"{', '.join(too_big)} exceed(s) one replica's budget",
        )
    if need > have:
        raise InsufficientCapacity(
            need_bytes=need, have_bytes=have, detail=f"{len(models)} pinned models"
        )
    previous = {m: i for m, i in (previous or {}).items() if m in models}
    assignment = _incremental(sizes, budget_bytes, max_sets, previous)
    if assignment is None:
        fresh = _first_fit_decreasing(sizes, budget_bytes, max_sets, {})
        if fresh is None:
            fresh = _exact(sizes, budget_bytes, max_sets, {})
        if fresh is None:
            raise InsufficientCapacity(
                need_bytes=need,
                have_bytes=have,
                detail=f"no packing of {len(models)} models into {max_sets} sets found",
            )
        assignment = _renumber(fresh, previous, max_sets)
    members: list[list[str]] = [[] for _ in range(max_sets)]
    for model_id, index in assignment.items():
        members[index].append(model_id)
    used = [sizes.used(ids) for ids in members]
    moved = sorted(m for m, i in assignment.items() if m in previous and previous[m] != i)
    return Placement(assignment=dict(sorted(assignment.items())), moved=moved, used_bytes=used)


def spec_bases(specs: Iterable[ModelSpec]) -> tuple[dict[str, str], dict[str, int]]:
    """``bases`` and ``base_sizes`` for :func:`place` from model specs: an adapter's base
    key is its base's sha256, its size the largest ``base_memory_bytes`` stated for it."""
    bases: dict[str, str] = {}
    base_sizes: dict[str, int] = {}
    for spec in specs:
        if spec.base_sha256:
            bases[spec.model_id] = spec.base_sha256
            base_sizes[spec.base_sha256] = max(
                spec.base_memory_bytes, base_sizes.get(spec.base_sha256, 0)
            )
    return bases, base_sizes


@dataclass(frozen=True)
class _Sizes:
    """The models' own bytes, the base of each adapter, and each base's bytes."""

    models: Mapping[str, int]
    base_of: Mapping[str, str]  # adapters only
    bases: Mapping[str, int]

    @classmethod
    def of(
        cls, models: Mapping[str, int], bases: Mapping[str, str], base_sizes: Mapping[str, int]
    ) -> _Sizes:
        base_of = {m: b for m, b in bases.items() if b and m in models}
        for model_id, base in sorted(base_of.items()):
            if base not in base_sizes:
                raise ValueError(f"model {model_id!r} has base {base!r} of no known size")
            if base_sizes[base] < 0:
                raise ValueError(f"base {base!r} has a negative size ({base_sizes[base]})")
        return cls(models, base_of, {b: base_sizes[b] for b in set(base_of.values())})

    def alone(self, model_id: str) -> int:
        """The bytes of a set holding only this model: its own and its base's."""
        base = self.base_of.get(model_id)
        return self.models[model_id] + (self.bases[base] if base else 0)

    def used(self, ids: Iterable[str]) -> int:
        """The bytes of a set holding ``ids``: their own, and each of their bases once."""
        ids = list(ids)
        held = {self.base_of[m] for m in ids if m in self.base_of}
        return sum(self.models[m] for m in ids) + sum(self.bases[b] for b in held)

    def order(self, ids: Iterable[str]) -> list[str]:
        """The order first-fit decreasing places in: largest first, the adapters of one base
        together, ranked by the base and those adapters' bytes; ties by id."""
        ids = list(ids)
        groups: dict[str, int] = {}
        for model_id in ids:
            base = self.base_of.get(model_id)
            if base is not None:
                groups[base] = groups.get(base, self.bases[base]) + self.models[model_id]

        def key(model_id: str) -> tuple[int, str, int, str]:
            base = self.base_of.get(model_id)
            size = self.models[model_id]
            if base is None:
                return (-size, "", -size, model_id)
            # "\0" before the base key: a base group never ties with a full model's "".
            return (-groups[base], "\0" + base, -size, model_id)

        return sorted(ids, key=key)


class _Sets:
    """The free bytes of every set and the bases it holds (with how many of its models use
    each): what first-fit and the exact search place into."""

    def __init__(self, sizes: _Sizes, budget: int, max_sets: int) -> None:
        self.sizes = sizes
        self.free = [budget] * max_sets
        self.held: list[dict[str, int]] = [{} for _ in range(max_sets)]

    def cost(self, model_id: str, index: int) -> int:
        """The bytes adding the model to the set takes: its own, and its base's if new."""
        base = self.sizes.base_of.get(model_id)
        extra = self.sizes.bases[base] if base is not None and base not in self.held[index] else 0
        return self.sizes.models[model_id] + extra

    def fits(self, model_id: str, index: int) -> bool:
        return self.free[index] >= self.cost(model_id, index)

    def add(self, model_id: str, index: int) -> None:
        self.free[index] -= self.cost(model_id, index)
        base = self.sizes.base_of.get(model_id)
        if base is not None:
            self.held[index][base] = self.held[index].get(base, 0) + 1

    def remove(self, model_id: str, index: int) -> None:
        self.free[index] += self.sizes.models[model_id]
        base = self.sizes.base_of.get(model_id)
        if base is not None:
            self.held[index][base] -= 1
            if not self.held[index][base]:
                del self.held[index][base]
                self.free[index] += self.sizes.bases[base]

    def candidates(self, model_id: str) -> list[int]:
        """Set indices to try, in order: those already holding the model's base, then the
        others."""
        base = self.sizes.base_of.get(model_id)
        every = range(len(self.free))
        if base is None:
            return list(every)
        holding = [i for i in every if base in self.held[i]]
        return [*holding, *(i for i in every if base not in self.held[i])]


def _incremental(
    sizes: _Sizes, budget: int, max_sets: int, previous: Mapping[str, int]
) -> dict[str, int] | None:
    """Rules 2 to 4: keep who fits where they were, place the rest in the free space."""
    kept: dict[int, list[str]] = {}
    for model_id, index in previous.items():
        if 0 <= index < max_sets:
            kept.setdefault(index, []).append(model_id)
    fixed: dict[str, int] = {}
    whole: dict[str, int] = {}  # the models of the sets that still hold all they held
    for index, members in kept.items():
        if sizes.used(members) <= budget:
            whole.update(dict.fromkeys(members, index))
        fixed.update(dict.fromkeys(_keep_most(sizes, members, budget), index))
    assignment = _first_fit_decreasing(sizes, budget, max_sets, fixed)
    if assignment is None:
        assignment = _exact(sizes, budget, max_sets, fixed)
    if assignment is None and whole != fixed:
        assignment = _exact(sizes, budget, max_sets, whole)
    return assignment


def _keep_most(sizes: _Sizes, members: list[str], budget: int) -> list[str]:
    """The most of one set's ``members`` that fit in it (the fewest leave; among equals, the
    fewest bytes kept, so the largest leave). Once the bases it keeps are chosen, keeping
    the smallest of the models they allow is best: so every subset of its bases is tried
    (up to EXACT_KEEP_BASES bases; beyond, one greedy pass)."""
    if sizes.used(members) <= budget:
        return members
    held = sorted({sizes.base_of[m] for m in members if m in sizes.base_of})
    smallest_first = sorted(members, key=lambda m: (sizes.models[m], m))
    if len(held) > EXACT_KEEP_BASES:
        return _greedy_keep(sizes, smallest_first, budget, allowed=None)
    best: list[str] = []
    best_key = (0, 0)
    for count in range(len(held) + 1):
        for allowed in itertools.combinations(held, count):
            keep = _greedy_keep(sizes, smallest_first, budget, allowed=set(allowed))
            key = (len(keep), -sizes.used(keep))
            if key > best_key:  # strictly better: the first found wins ties (deterministic)
                best, best_key = keep, key
    return best


def _greedy_keep(
    sizes: _Sizes, smallest_first: list[str], budget: int, *, allowed: set[str] | None
) -> list[str]:
    """Models in the order given while they fit: with ``allowed``, the bases in it are
    charged up front and adapters of other bases left out; without, each base is charged
    when its first adapter is kept."""
    used = sum(sizes.bases[b] for b in allowed) if allowed is not None else 0
    charged = set(allowed or ())
    keep: list[str] = []
    for model_id in smallest_first:
        base = sizes.base_of.get(model_id)
        if base is not None and allowed is not None and base not in allowed:
            continue
        cost = sizes.models[model_id]
        if base is not None and base not in charged:
            cost += sizes.bases[base]
        if used + cost <= budget:
            keep.append(model_id)
            used += cost
            if base is not None:
                charged.add(base)
    return keep


def _filled(sizes: _Sizes, budget: int, max_sets: int, fixed: Mapping[str, int]) -> _Sets:
    sets = _Sets(sizes, budget, max_sets)
    for model_id, index in fixed.items():
        sets.add(model_id, index)
    return sets


def _first_fit_decreasing(
    sizes: _Sizes, budget: int, max_sets: int, fixed: Mapping[str, int]
) -> dict[str, int] | None:
    """``fixed`` plus every other model in the first set with room (rule 3's order)."""
    sets = _filled(sizes, budget, max_sets, fixed)
    assignment = dict(fixed)
    for model_id in sizes.order(m for m in sizes.models if m not in fixed):
        index = next((i for i in sets.candidates(model_id) if sets.fits(model_id, i)), None)
        if index is None:
            return None
        sets.add(model_id, index)
        assignment[model_id] = index
    return assignment


def _exact(
    sizes: _Sizes, budget: int, max_sets: int, fixed: Mapping[str, int]
) -> dict[str, int] | None:
    """``fixed`` plus a depth-first search over set choices for the others, in rule 3's
    order, skipping sets whose free space and bases held equal those of one already tried
    (interchangeable for what is left); None when none exists or the step limit is reached.
    Iterative: a pool may hold more models than Python's recursion limit."""
    sets = _filled(sizes, budget, max_sets, fixed)
    order = sizes.order(m for m in sizes.models if m not in fixed)

    def options(model_id: str) -> Iterator[int]:
        tried: set[tuple[int, frozenset[str]]] = set()
        for index in sets.candidates(model_id):
            state = (sets.free[index], frozenset(sets.held[index]))
            if sets.fits(model_id, index) and state not in tried:
                tried.add(state)
                yield index

    chosen: list[int] = []
    # The untried choices of each position placed so far (computed on arriving there: the
    # sets are the same on every return to it, the later models being taken out again).
    pending: list[list[int]] = []
    steps = 0
    while len(chosen) < len(order):
        position = len(chosen)
        if len(pending) == position:
            steps += 1
            if steps > EXACT_SEARCH_STEPS:
                return None
            pending.append(list(options(order[position]))[::-1])
        if pending[position]:
            index = pending[position].pop()
            sets.add(order[position], index)
            chosen.append(index)
            continue
        pending.pop()
        if not chosen:
            return None
        sets.remove(order[position - 1], chosen.pop())
    return {**fixed, **dict(zip(order, chosen, strict=True))}


def _renumber(
    fresh: Mapping[str, int], previous: Mapping[str, int], max_sets: int
) -> dict[str, int]:
    """Relabel the sets of a fresh packing so the most models keep their old index: the
    (new set, old index) pairs sharing the most models are matched first (greedy)."""
    overlap: dict[tuple[int, int], int] = {}
    for model_id, new in fresh.items():
        old = previous.get(model_id)
        if old is not None and 0 <= old < max_sets:
            overlap[new, old] = overlap.get((new, old), 0) + 1
    mapping: dict[int, int] = {}
    taken: set[int] = set()
    for (new, old), _count in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):
        if new not in mapping and old not in taken:
            mapping[new] = old
            taken.add(old)
    spare = iter(i for i in range(max_sets) if i not in taken)
    for new in sorted(set(fresh.values())):
        if new not in mapping:
            mapping[new] = next(spare)
    return {model_id: mapping[new] for model_id, new in fresh.items()}
