"""Which replica set holds each pinned model: first-fit decreasing under a memory budget.

Pure (no Ray, no torch, no Django): the serving backend calls :func:`place` before it
changes anything, and the workbench may call it to preview a deployment.

The rules, in order:

1. A model bigger than one replica's budget, or pinned models that together exceed the
   pool's capacity (``max_sets * budget_bytes``), cannot be placed: :class:`InsufficientCapacity`
   ("need X, have Y") and nothing changes.
2. Models that stay keep their set (``previous``) unless their set no longer holds them (a
   model grew, the budget shrank, the pool lost sets): then the fewest models leave it,
   the largest first (fewest moves frees the most bytes).
3. New and displaced models go first-fit decreasing (largest first, ties by id so the
   result is deterministic) into the sets' free space; where that fails, an exact search
   over the same free space.
4. Failing that, every model of an overflowing set is free to go, the others stay.
5. Failing that, the whole pool is packed afresh (first-fit decreasing, then the exact
   search) and the new sets are numbered to keep as many models where they were as
   possible. Only if no packing is found is the placement refused.

So a model moves only when its set cannot hold it any more, or when no packing that keeps
every model of the sets that still fit exists.
"""

from __future__ import annotations

from collections.abc import Mapping

from worker.serving.specs import InsufficientCapacity, Placement

# The exact search (rule 4) gives up after this many steps: bin packing is NP-hard, and a
# pool first-fit decreasing cannot pack is rare and small in practice.
EXACT_SEARCH_STEPS = 200_000


def place(
    models: Mapping[str, int],
    *,
    budget_bytes: int,
    max_sets: int,
    previous: Mapping[str, int] | None = None,
) -> Placement:
    """Assign each model id (-> its ``memory_bytes``) to a set index in ``range(max_sets)``.

    ``used_bytes`` has one entry per set index (0 for an empty set); ``moved`` lists the
    models of ``previous`` whose set changed, sorted. Raises :class:`InsufficientCapacity`.
    """
    if budget_bytes <= 0 or max_sets <= 0:
        raise ValueError("budget_bytes and max_sets must be positive")
    for model_id, size in models.items():
        if size < 0:
            raise ValueError(f"model {model_id!r} has a negative size ({size})")
    need = sum(models.values())
    have = budget_bytes * max_sets
    too_big = sorted(m for m, size in models.items() if size > budget_bytes)
    if too_big:
        largest = max(models[m] for m in too_big)
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
    assignment = _incremental(models, budget_bytes, max_sets, previous)
    if assignment is None:
        fresh = _first_fit_decreasing(models, budget_bytes, max_sets, {})
        if fresh is None:
            fresh = _exact(models, budget_bytes, max_sets, {})
        if fresh is None:
            raise InsufficientCapacity(
                need_bytes=need,
                have_bytes=have,
                detail=f"no packing of {len(models)} models into {max_sets} sets found",
            )
        assignment = _renumber(fresh, previous, max_sets)
    used = [0] * max_sets
    for model_id, index in assignment.items():
        used[index] += models[model_id]
    moved = sorted(m for m, i in assignment.items() if m in previous and previous[m] != i)
    return Placement(assignment=dict(sorted(assignment.items())), moved=moved, used_bytes=used)


def _order(models: Mapping[str, int], ids: list[str]) -> list[str]:
    """Largest first, ties by id: the order first-fit decreasing places in."""
    return sorted(ids, key=lambda m: (-models[m], m))


def _incremental(
    models: Mapping[str, int], budget: int, max_sets: int, previous: Mapping[str, int]
) -> dict[str, int] | None:
    """Rules 2 to 4: keep who fits where they were, place the rest in the free space."""
    kept: dict[int, list[str]] = {}
    for model_id, index in previous.items():
        if 0 <= index < max_sets:
            kept.setdefault(index, []).append(model_id)
    fixed: dict[str, int] = {}
    whole: dict[str, int] = {}  # the models of the sets that still hold all they held
    for index, members in kept.items():
        if sum(models[m] for m in members) <= budget:
            whole.update(dict.fromkeys(members, index))
        # Smallest first, so the largest are the first left out when the set overflows.
        used = 0
        for model_id in sorted(members, key=lambda m: (models[m], m)):
            if used + models[model_id] <= budget:
                fixed[model_id] = index
                used += models[model_id]
    assignment = _first_fit_decreasing(models, budget, max_sets, fixed)
    if assignment is None:
        assignment = _exact(models, budget, max_sets, fixed)
    if assignment is None and whole != fixed:
        assignment = _exact(models, budget, max_sets, whole)
    return assignment


def _first_fit_decreasing(
    models: Mapping[str, int], budget: int, max_sets: int, fixed: Mapping[str, int]
) -> dict[str, int] | None:
    """``fixed`` plus every other model in the first set with room, largest first."""
    free = [budget] * max_sets
    assignment = dict(fixed)
    for model_id, index in fixed.items():
        free[index] -= models[model_id]
    for model_id in _order(models, [m for m in models if m not in fixed]):
        size = models[model_id]
        for index in range(max_sets):
            if free[index] >= size:
                free[index] -= size
                assignment[model_id] = index
                break
        else:
            return None
    return assignment


def _exact(
    models: Mapping[str, int], budget: int, max_sets: int, fixed: Mapping[str, int]
) -> dict[str, int] | None:
    """``fixed`` plus a depth-first search over set choices for the others, largest first,
    skipping sets whose free space equals one already tried (interchangeable for what is
    left); None when none exists or the step limit is reached."""
    free = [budget] * max_sets
    for model_id, index in fixed.items():
        free[index] -= models[model_id]
    order = _order(models, [m for m in models if m not in fixed])
    chosen: list[int] = []
    steps = 0

    def search(position: int) -> bool:
        nonlocal steps
        if position == len(order):
            return True
        steps += 1
        if steps > EXACT_SEARCH_STEPS:
            return False
        size = models[order[position]]
        tried: set[int] = set()
        for index in range(max_sets):
            if free[index] < size or free[index] in tried:
                continue
            tried.add(free[index])
            free[index] -= size
            chosen.append(index)
            if search(position + 1):
                return True
            chosen.pop()
            free[index] += size
        return False

    if not search(0):
        return None
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
