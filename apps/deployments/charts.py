"""Display numbers for the deployments and fleet pages: the fleet status turned into rows,
memory bars against a replica's budget, the warm-up latency chart.

Like the other ``charts`` modules this computes numbers and text only; the templates draw
the SVG, so every name is autoescaped. Nothing here queries the database: the fleet page's
one query (last warm-ups) is passed in.

The fleet status read here is ``ServingBackend.status()`` as ``fleet_status_for`` returns
it: see ``worker/serving/fleet.py`` (Ray) and ``worker/serving/sagemaker.py`` for the
shapes. Pools have ``sets`` and a ``tail`` of ``replicas``, each listing its ``models``
(entries with ``memory_bytes``, ``loaded``, ``load_ms``, ``hits``, ``misses``,
``requests``, ``latency_ms_p50``/``p99``, ``error``, ``format``, ``base_sha256``; or, for
SageMaker, model ids whose entries are the pool's ``models``) and, on Ray, the shared
``bases`` it holds (``base_model``, ``sha256``, ``memory_bytes``, ``adapters``); a model's
``memory_bytes`` is its own, an adapter's without its base. ``fleet_status_for`` adds the
pool's ``capacity``, the owner of each model the user may see (``tenant``, ``model``,
``version``, ``deployments``), each base's ``name`` and, per replica,
``other_tenants_models`` / ``other_tenants_memory_bytes``. The shape is read defensively:
any key may be missing (older replicas and SageMaker publish no ``bases``), and a missing
number shows as "—".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from django.template.defaultfilters import filesizeformat

from apps.training.charts import LineChart, SeriesData, color, line_chart

BAR_WIDTH = 360
BAR_HEIGHT = 16
SMALL_BAR_WIDTH = 120
SMALL_BAR_HEIGHT = 10
OTHERS_FILL = "#9aa5b1"
BASE_FILL = "#52606d"
OVER_FILL = "#b42318"


# --- small formatting helpers -------------------------------------------------------------


def number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (a bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def size(value: float | None) -> str:
    """Bytes as the templates' ``filesizeformat`` writes them, so the page reads one way."""
    return "—" if value is None else str(filesizeformat(value))


def ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def _int(value: Any) -> int:
    found = number(value)
    return int(found) if found is not None else 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# --- memory bars --------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    x: float
    width: float
    fill: str
    title: str
    name: str  # data-name: a model id, "base-<sha256>" or "other-tenants"


@dataclass(frozen=True)
class MemoryBar:
    """Used memory against a budget. When more is used than the budget allows, the bar
    spans the use and a red line marks where the budget ends."""

    width: int
    height: int
    segments: list[Segment]
    used_bytes: int
    budget_bytes: int | None
    budget_x: float | None  # where the budget ends, when the use runs over it

    @property
    def over(self) -> bool:
        return self.budget_bytes is not None and self.used_bytes > self.budget_bytes

    @property
    def share(self) -> float | None:
        return self.used_bytes / self.budget_bytes if self.budget_bytes else None

    @property
    def summary(self) -> str:
        if not self.budget_bytes:
            return f"{size(self.used_bytes)} used (no budget known)"
        return f"{size(self.used_bytes)} of {size(self.budget_bytes)} ({self.share:.0%})"


def memory_bar(
    parts: Sequence[tuple[str, str, int, str]],
    budget_bytes: int | None,
    *,
    width: int = BAR_WIDTH,
    height: int = BAR_HEIGHT,
) -> MemoryBar:
    """``parts``: (name, title, bytes, fill) in drawing order."""
    used = sum(max(size, 0) for _, _, size, _ in parts)
    budget = budget_bytes if budget_bytes and budget_bytes > 0 else None
    scale_to = max(used, budget or 0) or 1
    segments: list[Segment] = []
    x = 0.0
    for name, title, size, fill in parts:
        if size <= 0:
            continue
        w = round(size / scale_to * width, 2)
        segments.append(Segment(x=round(x, 2), width=w, fill=fill, title=title, name=name))
        x += w
    budget_x = round(budget / scale_to * width, 2) if budget is not None and used > budget else None
    return MemoryBar(
        width=width,
        height=height,
        segments=segments,
        used_bytes=used,
        budget_bytes=budget,
        budget_x=budget_x,
    )


# --- the fleet ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentRef:
    id: str
    environment: str
    status: str


@dataclass(frozen=True)
class FleetModel:
    model_id: str
    tenant: str  # "" when the status does not say (a staff user's view of an unknown id)
    name: str
    version: int | None
    deployments: list[DeploymentRef]
    memory_bytes: int  # its own: an adapter's without the shared base
    loaded: bool  # False: listed (a tail model asked for) but not in memory
    adapter: bool
    base_sha256: str  # an adapter's base; "" for a full model
    bar: MemoryBar
    fill: str
    load_ms: float | None
    hits: int | None
    misses: int | None
    requests: int | None
    errors: int | None
    p50_ms: float | None
    p99_ms: float | None
    error: str
    last_warmup_at: datetime | None
    last_warmup_ms: float | None

    @property
    def label(self) -> str:
        if self.name:
            return f"{self.name} v{self.version}" if self.version is not None else self.name
        return self.model_id

    @property
    def segment_title(self) -> str:
        kind = " (adapter)" if self.adapter else ""
        return f"{self.label}{kind}: {size(self.memory_bytes)}"

    @property
    def hit_ratio(self) -> float | None:
        if self.hits is None or self.misses is None or self.hits + self.misses == 0:
            return None
        return self.hits / (self.hits + self.misses)

    @property
    def hit_ratio_text(self) -> str:
        ratio = self.hit_ratio
        return "—" if ratio is None else f"{ratio:.0%}"


@dataclass(frozen=True)
class FleetBase:
    """Shared weights a replica holds once for all its adapters, whoever's they are."""

    name: str  # the weights' name ("all-MiniLM-L6-v2")
    sha256: str
    memory_bytes: int
    adapters: int  # loaded on it, every tenant's
    own_adapters: int  # of those, the ones the viewer sees

    @property
    def short_sha256(self) -> str:
        return self.sha256[:12]

    @property
    def title(self) -> str:
        count = f"{self.adapters} adapter{'' if self.adapters == 1 else 's'}"
        return f"{self.name} (shared base) · {size(self.memory_bytes)} · {count}"


@dataclass(frozen=True)
class FleetReplica:
    replica_id: str
    state: str
    device: str
    started_at: datetime | None
    models: list[FleetModel]
    bases: list[FleetBase]
    other_models: int
    other_bytes: int
    bar: MemoryBar

    @property
    def adapter_count(self) -> int:
        return sum(b.adapters for b in self.bases)

    @property
    def own_adapter_count(self) -> int:
        return sum(b.own_adapters for b in self.bases)


@dataclass(frozen=True)
class FleetSet:
    name: str
    index: int | None
    tail: bool
    budget_bytes: int | None
    replicas: list[FleetReplica]

    @property
    def title(self) -> str:
        if self.tail:
            return "Long-tail tier"
        return f"Replica set {self.index}" if self.index is not None else self.name


@dataclass(frozen=True)
class FleetPool:
    kind: str
    capacity: dict[str, Any]
    sets: list[FleetSet]

    @property
    def replica_count(self) -> int:
        return sum(len(s.replicas) for s in self.sets)

    @property
    def model_count(self) -> int:
        return len({m.model_id for s in self.sets for r in s.replicas for m in r.models})

    @property
    def capacity_bytes(self) -> int | None:
        per_set = number(self.capacity.get("replica_memory_bytes"))
        sets = number(self.capacity.get("max_sets"))
        return int(per_set * sets) if per_set is not None and sets is not None else None


@dataclass(frozen=True)
class FleetView:
    pools: list[FleetPool]

    @property
    def replica_count(self) -> int:
        return sum(p.replica_count for p in self.pools)


Warmups = Mapping[str, tuple[datetime | None, float | None]]


def _sets(pool: Mapping[str, Any]) -> list[tuple[dict[str, Any], bool]]:
    sets = [(_dict(s), False) for s in _list(pool.get("sets"))]
    tail = _dict(pool.get("tail"))
    if tail:
        sets.append((tail, True))
    return sets


def _entries(pool: Mapping[str, Any], replica: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A replica's model entries. A backend that lists only ids on a replica (SageMaker's
    endpoint instances) keeps the models' details at the pool level."""
    by_id = {str(m.get("model_id")): m for m in map(_dict, _list(pool.get("models"))) if m}
    entries = []
    for raw in _list(replica.get("models")):
        if isinstance(raw, str):
            entries.append(by_id.get(raw, {"model_id": raw}))
        elif isinstance(raw, dict):
            entries.append(raw)
    return entries


def _refs(entry: Mapping[str, Any]) -> list[DeploymentRef]:
    refs = []
    for d in map(_dict, _list(entry.get("deployments"))):
        if d.get("id"):
            refs.append(
                DeploymentRef(
                    id=str(d["id"]),
                    environment=str(d.get("environment", "")),
                    status=str(d.get("status", "")),
                )
            )
    return refs


def deployment_ids(status: Mapping[str, Any]) -> set[str]:
    """Every deployment id the status names (to look their last warm-ups up)."""
    found: set[str] = set()
    for pool in map(_dict, _list(status.get("pools"))):
        for set_, _ in _sets(pool):
            for replica in map(_dict, _list(set_.get("replicas"))):
                for entry in _entries(pool, replica):
                    found.update(ref.id for ref in _refs(entry))
    return found


def _last_warmup(
    refs: Iterable[DeploymentRef], warmups: Warmups
) -> tuple[datetime | None, float | None]:
    best: tuple[datetime | None, float | None] = (None, None)
    for ref in refs:
        at, latency = warmups.get(ref.id, (None, None))
        if at is not None and (best[0] is None or at > best[0]):
            best = (at, latency)
    return best


def _opt_int(value: Any) -> int | None:
    found = number(value)
    return int(found) if found is not None else None


def _time(value: Any) -> datetime | None:
    """A replica's start, as unix seconds (Ray) or an ISO 8601 string."""
    seconds = number(value)
    if seconds is not None:
        return datetime.fromtimestamp(seconds, tz=UTC)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _model(entry: Mapping[str, Any], budget: int | None, fill: str, warmups: Warmups) -> FleetModel:
    model_id = str(entry.get("model_id") or "?")
    refs = _refs(entry)
    footprint = _int(entry.get("memory_bytes"))
    at, latency = _last_warmup(refs, warmups)
    model = FleetModel(
        model_id=model_id,
        tenant=str(entry.get("tenant") or ""),
        name=str(entry.get("model") or ""),
        version=_opt_int(entry.get("version")),
        deployments=refs,
        memory_bytes=footprint,
        loaded=entry.get("loaded") is not False,
        adapter=entry.get("format") == "adapter",
        base_sha256=str(entry.get("base_sha256") or ""),
        bar=memory_bar([], budget),
        fill=fill,
        load_ms=number(entry.get("load_ms")),
        hits=_opt_int(entry.get("hits")),
        misses=_opt_int(entry.get("misses")),
        requests=_opt_int(entry.get("requests")),
        errors=_opt_int(entry.get("errors")),
        p50_ms=number(entry.get("latency_ms_p50")),
        p99_ms=number(entry.get("latency_ms_p99")),
        error=str(entry.get("error") or ""),
        last_warmup_at=at,
        last_warmup_ms=latency,
    )
    # The bar's tooltip names the model, which needs the label above.
    bar = memory_bar(
        [(model_id, f"{model.label}: {size(footprint)}", footprint, fill)],
        budget,
        width=SMALL_BAR_WIDTH,
        height=SMALL_BAR_HEIGHT,
    )
    return replace(model, bar=bar)


def _replica(
    pool: Mapping[str, Any],
    replica: Mapping[str, Any],
    budget: int | None,
    colours: dict[str, str],
    warmups: Warmups,
) -> FleetReplica:
    models = []
    for entry in _entries(pool, replica):
        model_id = str(entry.get("model_id") or "?")
        fill = colours.setdefault(model_id, color(len(colours)))
        models.append(_model(entry, budget, fill, warmups))
    models.sort(key=lambda m: (-m.memory_bytes, m.label))
    other_bytes = _int(replica.get("other_tenants_memory_bytes"))
    other_models = _int(replica.get("other_tenants_models"))
    bases = _bases(replica, models)
    # Each shared base once, then what each model adds. Only what is in memory counts
    # against the budget (a tail replica also lists the models it was asked for and has
    # not loaded).
    parts = [(f"base-{b.sha256}", b.title, b.memory_bytes, BASE_FILL) for b in bases]
    parts += [(m.model_id, m.segment_title, m.memory_bytes, m.fill) for m in models if m.loaded]
    if other_bytes:
        title = f"other tenants' models ({other_models}): {size(other_bytes)}"
        parts.append(("other-tenants", title, other_bytes, OTHERS_FILL))
    return FleetReplica(
        replica_id=str(replica.get("replica_id") or "?"),
        state=str(replica.get("state") or ""),
        device=str(replica.get("device") or ""),
        started_at=_time(replica.get("started_at")),
        models=models,
        bases=bases,
        other_models=other_models,
        other_bytes=other_bytes,
        bar=memory_bar(parts, budget),
    )


def _bases(replica: Mapping[str, Any], models: Sequence[FleetModel]) -> list[FleetBase]:
    bases = []
    for raw in map(_dict, _list(replica.get("bases"))):
        sha256 = str(raw.get("sha256") or "")
        if not sha256:
            continue
        own = sum(1 for m in models if m.loaded and m.adapter and m.base_sha256 == sha256)
        bases.append(
            FleetBase(
                name=str(raw.get("name") or raw.get("base_model") or sha256[:12]),
                sha256=sha256,
                memory_bytes=_int(raw.get("memory_bytes")),
                adapters=_int(raw.get("adapters")),
                own_adapters=own,
            )
        )
    return bases


def fleet_view(status: Mapping[str, Any], warmups: Warmups | None = None) -> FleetView:
    """The fleet status as pools > replica sets > replicas > models, each replica with a
    memory bar of its models (and other tenants' memory, unnamed) against its budget."""
    colours: dict[str, str] = {}
    pools: list[FleetPool] = []
    for pool in map(_dict, _list(status.get("pools"))):
        # The workbench's capacity settings; else what the backend was last told.
        capacity = _dict(pool.get("capacity")) or _dict(pool.get("pool")) or _dict(pool.get("spec"))
        sets: list[FleetSet] = []
        for position, (raw_set, tail) in enumerate(_sets(pool)):
            key = "tail_memory_bytes" if tail else "replica_memory_bytes"
            found = number(raw_set.get("budget_bytes")) or number(capacity.get(key))
            budget = int(found) if found else None
            replicas = [
                _replica(pool, replica, budget, colours, warmups or {})
                for replica in map(_dict, _list(raw_set.get("replicas")))
            ]
            index = _opt_int(raw_set.get("index"))
            sets.append(
                FleetSet(
                    name=str(raw_set.get("name") or ("tail" if tail else f"set-{position}")),
                    index=position if index is None and not tail else index,
                    tail=tail,
                    budget_bytes=budget,
                    replicas=replicas,
                )
            )
        pools.append(FleetPool(kind=str(pool.get("kind") or "?"), capacity=capacity, sets=sets))
    pools.sort(key=lambda p: p.kind)
    return FleetView(pools=pools)


# --- warm-ups -----------------------------------------------------------------------------


def warmup_chart(
    rows: Sequence[tuple[float | None, float | None, float | None]], *, chart_id: str
) -> LineChart | None:
    """Median and slowest latency of each warm-up, oldest first, with the policy's budget.
    ``rows``: (p50, max, budget) per warm-up. None when no warm-up measured anything."""
    p50 = [(float(i), v) for i, (v, _, _) in enumerate(rows, start=1) if v is not None]
    slowest = [(float(i), v) for i, (_, v, _) in enumerate(rows, start=1) if v is not None]
    budget = [(float(i), v) for i, (_, _, v) in enumerate(rows, start=1) if v is not None]
    if not p50 and not slowest:
        return None
    series = [
        SeriesData(name="p50", label="median latency", points=p50, color=color(0)),
        SeriesData(name="max", label="slowest request", points=slowest, color=color(1)),
    ]
    if budget:
        series.append(SeriesData(name="budget", label="latency budget", points=budget,
                                 color=OVER_FILL))  # fmt: skip
    return line_chart(
        chart_id=chart_id,
        title="Warm-up latency",
        x_label="warm-up",
        y_label="ms",
        series=series,
        y_range=(0.0, max(v for s in series for _, v in s.points) * 1.1 or 1.0),
    )
