"""Model health across tenants, for staff: how good the models in production are, which
versions measured worse than their champion, which production models are old, and which
tenants have none in production — of one model kind at a time.

``model_health`` computes it (it reads every production version: about a second at 30,000
models); the page and the API serve ``health_report``: the last report computed for that
query, with its age, recomputed in the background once older than
``MODEL_HEALTH_MAX_AGE_S`` (or at once, when asked for fresh).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Avg, FloatField, Q
from django.db.models.fields.json import KT
from django.db.models.functions import Cast
from django.utils import timezone

from apps.datasets.models import DatasetKind
from apps.evaluation.models import EvalStatus, Evaluation
from apps.evaluation.services import AUTOCOMPLETE_HEADLINE, RETRIEVAL_HEADLINE
from apps.promotions.gates import champion_delta
from apps.promotions.models import PromotionRequest
from apps.registry.models import HealthReport, ModelKind, ModelVersion, Stage
from apps.tenants.models import Tenant

HEALTH_METRICS: dict[str, tuple[str, ...]] = {
    ModelKind.CLASSIFIER: ("macro_f1", "accuracy"),
    ModelKind.EMBEDDING: RETRIEVAL_HEADLINE,
    ModelKind.AUTOCOMPLETE: AUTOCOMPLETE_HEADLINE,
}
BINS = 10
log = logging.getLogger(__name__)
# Promotion requests read for regressions: the newest this many (a request per version
# that was put up; older ones speak of versions long superseded).
RECENT_PROMOTIONS = 5000


@dataclass
class MetricSpread:
    metric: str
    count: int
    min: float | None
    p10: float | None
    p50: float | None
    p90: float | None
    max: float | None
    histogram: list[int]  # BINS equal bins over [0, 1]


@dataclass
class Health:
    kind: str
    production_versions: int
    metrics: list[MetricSpread]
    regressed: list[dict[str, Any]]
    stale: list[dict[str, Any]]
    stale_count: int
    no_production_count: int
    no_production: list[str]
    older_than_days: int
    limit: int = field(default=100)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[max(0, int(q * 100) - 1)]


def _spread(metric: str, values: list[float]) -> MetricSpread:
    histogram = [0] * BINS
    for value in values:
        histogram[min(BINS - 1, max(0, int(value * BINS)))] += 1
    if not values:
        return MetricSpread(metric, 0, None, None, None, None, None, histogram)
    return MetricSpread(
        metric=metric,
        count=len(values),
        min=round(min(values), 4),
        p10=round(_quantile(values, 0.10), 4),
        p50=round(statistics.median(values), 4),
        p90=round(_quantile(values, 0.90), 4),
        max=round(max(values), 4),
        histogram=histogram,
    )


@dataclass
class Served:
    """A health report as served: when it was computed, how long that took, and whether a
    newer one is being computed (the report is older than the maximum age)."""

    health: Health
    computed_at: datetime
    took_ms: float
    refreshing: bool

    @property
    def age_seconds(self) -> float:
        return max(0.0, (timezone.now() - self.computed_at).total_seconds())


def _from_json(report: dict[str, Any]) -> Health:
    data = dict(report)
    data["metrics"] = [MetricSpread(**m) for m in data["metrics"]]
    return Health(**data)


def refresh_report(*, kind: str, older_than_days: int = 90, limit: int = 100) -> HealthReport:
    """Compute the report for this query now and store it (replacing the last one)."""
    started = time.perf_counter()
    health = model_health(kind=kind, older_than_days=older_than_days, limit=limit)
    took_ms = (time.perf_counter() - started) * 1000
    values = {
        "report": dataclasses.asdict(health),
        "computed_at": timezone.now(),
        "took_ms": round(took_ms, 1),
        "refresh_sent_at": None,
    }
    query: dict[str, Any] = {"kind": kind, "older_than_days": older_than_days, "limit": limit}
    try:
        with transaction.atomic():
            row, _ = HealthReport.objects.update_or_create(defaults=values, **query)
    except IntegrityError:  # computed at the same moment elsewhere: the other one stands
        row = HealthReport.objects.get(**query)
    return row


def health_report(
    *, kind: str, older_than_days: int = 90, limit: int = 100, fresh: bool = False
) -> Served:
    """The health report for this query as the page and the API serve it: the last one
    computed while it is younger than ``MODEL_HEALTH_MAX_AGE_S``; an older one is served
    while a worker computes the next; computed here when there is none yet, or ``fresh``."""
    query: dict[str, Any] = {"kind": kind, "older_than_days": older_than_days, "limit": limit}
    row = None if fresh else HealthReport.objects.filter(**query).first()
    if row is None:
        row = refresh_report(kind=kind, older_than_days=older_than_days, limit=limit)
    refreshing = False
    now = timezone.now()
    if (now - row.computed_at).total_seconds() > settings.MODEL_HEALTH_MAX_AGE_S:
        refreshing = _send_refresh(row, now)
    return Served(_from_json(row.report), row.computed_at, row.took_ms, refreshing)


def _send_refresh(row: HealthReport, now: datetime) -> bool:
    """Ask a worker to recompute ``row`` unless one was asked lately; True once asked."""
    from apps.registry.tasks import refresh_health

    lately = now - timedelta(seconds=settings.MODEL_HEALTH_MAX_AGE_S)
    claimed = (
        HealthReport.objects.filter(pk=row.pk)
        .filter(Q(refresh_sent_at__isnull=True) | Q(refresh_sent_at__lt=lately))
        .update(refresh_sent_at=now)
    )
    if claimed:
        try:
            refresh_health.delay(row.kind, row.older_than_days, row.limit)
        except Exception:  # the broker is down: beat's sweep recomputes it later
            log.warning("could not enqueue a model health refresh", extra={"kind": row.kind})
    return True


def refresh_stale_reports() -> int:
    """Recompute every stored report older than the maximum age (beat's sweep); how many."""
    cutoff = timezone.now() - timedelta(seconds=settings.MODEL_HEALTH_MAX_AGE_S)
    stale = list(
        HealthReport.objects.filter(computed_at__lt=cutoff).values_list(
            "kind", "older_than_days", "limit"
        )
    )
    for kind, older_than_days, limit in stale:
        refresh_report(kind=kind, older_than_days=older_than_days, limit=limit)
    return len(stale)


def _golden_means(kind: str, metric: str) -> list[float]:
    """Each production version's ``metric``: the mean over its golden sets' evaluations,
    computed by the database (one row per version, no JSON leaves it)."""
    value = Cast(KT(f"metrics__{metric}"), FloatField())
    return [
        float(mean)
        for mean in Evaluation.objects.filter(
            model_version__stage=Stage.PRODUCTION,
            model_version__registered_model__kind=kind,
            status=EvalStatus.SUCCEEDED,
            dataset_version__dataset__kind=DatasetKind.GOLDEN,
            **{f"metrics__{metric}__isnull": False},
        )
        .values("model_version_id")
        .annotate(mean=Avg(value))
        .order_by()
        .values_list("mean", flat=True)
        if mean is not None
    ]


def model_health(*, kind: str, older_than_days: int = 90, limit: int = 100) -> Health:
    production = ModelVersion.objects.filter(stage=Stage.PRODUCTION, registered_model__kind=kind)
    spreads = [
        _spread(metric, _golden_means(kind, metric)) for metric in HEALTH_METRICS.get(kind, ())
    ]
    now = timezone.now()
    old = production.filter(created_at__lt=now - timedelta(days=older_than_days))
    stale = [
        {
            "tenant": v.registered_model.tenant.slug,
            "model": v.registered_model.name,
            "version": v.number,
            "model_version": v.pk,
            "age_days": (now - v.created_at).days,
        }
        for v in old.select_related("registered_model__tenant").order_by("created_at", "id")[:limit]
    ]
    missing = Tenant.objects.exclude(
        pk__in=production.values("registered_model__tenant_id")
    ).order_by("slug")
    return Health(
        kind=kind,
        production_versions=production.count(),
        metrics=spreads,
        regressed=_regressed(kind, limit),
        stale=stale,
        stale_count=old.count(),
        no_production_count=missing.count(),
        no_production=list(missing.values_list("slug", flat=True)[:limit]),
        older_than_days=older_than_days,
        limit=limit,
    )


def _regressed(kind: str, limit: int) -> list[dict[str, Any]]:
    """Versions whose latest request measured them below their champion (or yardstick) on a
    regression metric: each such gate row with its values and the gap."""
    seen: set[str] = set()
    found: list[dict[str, Any]] = []
    recent = (
        PromotionRequest.objects.filter(model_version__registered_model__kind=kind)
        .exclude(gate_results=[])
        .select_related("tenant", "model_version__registered_model")
        .order_by("-created_at")[:RECENT_PROMOTIONS]
    )
    for promotion in recent:
        if promotion.model_version_id in seen:
            continue
        seen.add(promotion.model_version_id)
        for row in promotion.gate_results:
            delta = champion_delta(row)
            if delta is not None and delta < 0:
                found.append({
                    "tenant": promotion.tenant.slug,
                    "model": promotion.model_version.registered_model.name,
                    "version": promotion.model_version.number,
                    "model_version": promotion.model_version_id,
                    "promotion": promotion.pk,
                    "status": promotion.status,
                    "against": str(row["gate"]).removeprefix("regression vs "),
                    "dataset": row.get("dataset_name") or row.get("dataset"),
                    "metric": row.get("metric"),
                    "value": float(row["value"]),
                    "champion_value": float(row["champion_value"]),
                    "delta": round(delta, 4),
                })  # fmt: skip
        if len(found) >= limit:
            break
    return found[:limit]
