"""Which queued runs go to the workers next: weighted fair share of one training budget.

Every campaign is one queue with its weight; each tenant's one-off runs (launched by hand,
by a sweep or by automation) are a queue of weight 1. While the budget has room the next
run comes from the queue with the smallest share in use — its running runs over its weight
— oldest queue head first on a tie; a tenant at its own limit is passed over. A campaign of
200 tenants therefore takes its share and no more, and a one-off run waits for one free
slot at most, never for the campaign (Kueue's fair sharing, on a single resource).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Waiting:
    run_id: str
    tenant_id: str
    queue: str  # "campaign:<id>" or "tenant:<id>"
    created_at: datetime


@dataclass(frozen=True)
class Busy:
    tenant_id: str
    queue: str


def queue_of(*, tenant_id: str, campaign_id: str | None) -> str:
    return f"campaign:{campaign_id}" if campaign_id else f"tenant:{tenant_id}"


def pick(
    waiting: Iterable[Waiting],
    busy: Iterable[Busy],
    *,
    budget: int,
    tenant_limit: dict[str, int],
    weights: dict[str, float] | None = None,
) -> list[str]:
    """The run ids to dispatch now, in the order they go."""
    weights = weights or {}
    busy = list(busy)
    in_queue = Counter(b.queue for b in busy)
    in_tenant = Counter(b.tenant_id for b in busy)
    queues: dict[str, list[Waiting]] = {}
    for run in sorted(waiting, key=lambda w: (w.created_at, w.run_id)):
        queues.setdefault(run.queue, []).append(run)
    free = budget - len(busy)
    chosen: list[str] = []
    while free > 0:
        best: tuple[float, datetime, str] | None = None
        best_index = -1
        for queue, runs in queues.items():
            index = next(
                (
                    i
                    for i, r in enumerate(runs)
                    if in_tenant[r.tenant_id] < tenant_limit[r.tenant_id]
                ),
                -1,
            )
            if index < 0:
                continue
            key = (
                in_queue[queue] / max(weights.get(queue, 1.0), 1e-9),
                runs[index].created_at,
                queue,
            )
            if best is None or key < best:
                best, best_index = key, index
        if best is None:
            break
        run = queues[best[2]].pop(best_index)
        if not queues[best[2]]:
            del queues[best[2]]
        chosen.append(run.run_id)
        in_queue[run.queue] += 1
        in_tenant[run.tenant_id] += 1
        free -= 1
    return chosen
