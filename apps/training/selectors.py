from __future__ import annotations

from django.db.models import QuerySet

from apps.tenants.models import Tenant
from apps.training.models import RunMetric, RunStatus, Sweep, TrainingRun


def runs_for_tenant(*, tenant: Tenant) -> QuerySet[TrainingRun]:
    return (
        TrainingRun.objects.filter(tenant=tenant)
        .select_related(
            "dataset_version__dataset",
            "validation_version__dataset",
            "created_by",
            "model_version__registered_model",
        )
        .order_by("-created_at", "id")
    )


def queue_positions(*, tenant: Tenant) -> dict[str, int]:
    """1-based place of each waiting (not yet dispatched) run in its tenant's queue."""
    waiting = (
        TrainingRun.objects.filter(
            tenant=tenant, status=RunStatus.QUEUED, dispatched_at__isnull=True
        )
        .order_by("created_at", "id")
        .values_list("pk", flat=True)
    )
    return {run_id: index + 1 for index, run_id in enumerate(waiting)}


def metric_points(*, run: TrainingRun, name: str | None = None) -> QuerySet[RunMetric]:
    points = RunMetric.objects.filter(run=run).order_by("name", "step")
    return points.filter(name=name) if name else points


def sweeps_for_tenant(*, tenant: Tenant) -> QuerySet[Sweep]:
    return Sweep.objects.filter(tenant=tenant).select_related("dataset_version__dataset")


def sweep_best_run(*, sweep: Sweep) -> TrainingRun | None:
    best: TrainingRun | None = None
    best_value: float | None = None
    for run in sweep.runs.filter(status=RunStatus.SUCCEEDED):
        value = run.metrics.get(sweep.metric)
        if value is None:
            continue
        better = best_value is None or (
            value > best_value if sweep.goal == "max" else value < best_value
        )
        if better:
            best, best_value = run, float(value)
    return best
