"""Evaluations of model versions on golden sets, and promotion policies."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from apps.audit.services import audit_record
from apps.core.errors import InvalidInput
from apps.datasets.models import DatasetKind, DatasetVersion
from apps.evaluation.models import EvalStatus, Evaluation, PromotionPolicy
from apps.registry.models import ModelVersion
from apps.tenants.models import Tenant

DEFAULT_GATES: list[dict[str, Any]] = [
    {"metric": "macro_f1", "op": ">=", "value": 0.7, "dataset": None},
    {"metric": "latency_ms_p95", "op": "<=", "value": 50.0, "dataset": None},
]
GATE_METRICS = (
    "accuracy",
    "macro_f1",
    "ece",
    "latency_ms_p50",
    "latency_ms_p95",
    "peak_memory_bytes",
)
GATE_OPS = (">=", ">", "<=", "<", "==")


def default_evaluation_versions(*, tenant: Tenant) -> list[tuple[DatasetVersion, int | None]]:
    """The n+1 kinds of datasets a model must pass: the latest version of each of the
    tenant's golden sets (all rows), of each shared golden set of the tenant's domain
    vertical, and of each of its sample sets (a random ``EVALUATION_SAMPLE_ROWS`` rows)."""
    chosen: list[tuple[DatasetVersion, int | None]] = []
    latest = (
        DatasetVersion.objects.filter(
            dataset__tenant=tenant, dataset__kind__in=[DatasetKind.GOLDEN, DatasetKind.SAMPLE]
        )
        .values("dataset_id")
        .annotate(n=Max("number"))
    )
    for row in latest:
        version = DatasetVersion.objects.select_related("dataset").get(
            dataset_id=row["dataset_id"], number=row["n"]
        )
        sample = (
            settings.EVALUATION_SAMPLE_ROWS if version.dataset.kind == DatasetKind.SAMPLE else None
        )
        chosen.append((version, sample))
    if tenant.domain:
        shared = (
            DatasetVersion.objects.filter(
                dataset__tenant__isnull=True,
                dataset__domain=tenant.domain,
                dataset__kind=DatasetKind.GOLDEN,
            )
            .values("dataset_id")
            .annotate(n=Max("number"))
        )
        for row in shared:
            version = DatasetVersion.objects.select_related("dataset").get(
                dataset_id=row["dataset_id"], number=row["n"]
            )
            chosen.append((version, None))
    return sorted(chosen, key=lambda item: item[0].dataset.name)


@transaction.atomic
def evaluation_request(
    *,
    actor: Any,
    tenant: Tenant,
    model_version: ModelVersion,
    dataset_versions: list[DatasetVersion] | None = None,
    via: str = "",
) -> list[Evaluation]:
    """Queue one evaluation per dataset version (default: every golden and sample set)."""
    from apps.evaluation.tasks import run_evaluation

    if dataset_versions:
        targets: list[tuple[DatasetVersion, int | None]] = [(v, None) for v in dataset_versions]
    else:
        targets = default_evaluation_versions(tenant=tenant)
    if not targets:
        raise InvalidInput(
            "this tenant has no golden or sample dataset to evaluate on; upload one first",
            fields={"dataset_versions": ["No golden or sample dataset version to evaluate on."]},
        )
    created = []
    for version, max_rows in targets:
        evaluation = Evaluation.objects.create(
            tenant=tenant,
            model_version=model_version,
            dataset_version=version,
            artifact_sha256=model_version.sha256,
            max_rows=max_rows,
            requested_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        audit_record(
            actor=actor,
            tenant=tenant,
            verb="evaluation.request",
            obj=evaluation,
            after={"model_version": model_version.pk, "dataset_version": version.pk},
            via=via,
        )
        transaction.on_commit(
            lambda eid=evaluation.pk: run_evaluation.apply_async(  # type: ignore[misc]
                (eid,), queue=settings.TRAINING_QUEUE
            )
        )
        created.append(evaluation)
    return created


def evaluation_claim(*, evaluation_id: str) -> Evaluation | None:
    claimed = Evaluation.objects.filter(pk=evaluation_id, status=EvalStatus.QUEUED).update(
        status=EvalStatus.RUNNING
    )
    if not claimed:
        return None
    return Evaluation.objects.select_related(
        "model_version__run",
        "model_version__registered_model",
        "dataset_version__dataset",
        "tenant",
    ).get(pk=evaluation_id)


@transaction.atomic
def evaluation_finish(
    *,
    evaluation_id: str,
    metrics: dict[str, Any] | None = None,
    samples: list[dict[str, Any]] | None = None,
    error: str = "",
) -> Evaluation | None:
    evaluation = (
        Evaluation.objects.select_for_update()
        .filter(pk=evaluation_id, status=EvalStatus.RUNNING)
        .first()
    )
    if evaluation is None:
        return None
    evaluation.status = EvalStatus.FAILED if error else EvalStatus.SUCCEEDED
    evaluation.metrics = metrics or {}
    evaluation.samples = samples or []
    evaluation.error = error[-4000:]
    evaluation.finished_at = timezone.now()
    evaluation.save()
    # Requests waiting on this evaluation move on once it is recorded.
    transaction.on_commit(_enqueue_promotion_checks)
    audit_record(
        actor=None,
        tenant=evaluation.tenant,
        verb=f"evaluation.{evaluation.status}",
        obj=evaluation,
        after={
            "status": evaluation.status,
            "accuracy": (metrics or {}).get("accuracy"),
            "macro_f1": (metrics or {}).get("macro_f1"),
        },
        via="task",
    )
    return evaluation


def _enqueue_promotion_checks() -> None:
    from apps.promotions.tasks import check_waiting_promotions

    check_waiting_promotions.delay()


def policy_for(*, tenant: Tenant, model_kind: str) -> PromotionPolicy:
    """The tenant's policy for a kind; the sensible default (unsaved) when none was set."""
    found = PromotionPolicy.objects.filter(tenant=tenant, model_kind=model_kind).first()
    return found or PromotionPolicy(
        tenant=tenant, model_kind=model_kind, gates=[dict(g) for g in DEFAULT_GATES]
    )


@transaction.atomic
def policy_update(
    *,
    actor: Any,
    tenant: Tenant,
    model_kind: str,
    gates: list[dict[str, Any]],
    max_regression_vs_champion: float | None,
    latency_budget_ms: float | None,
    require_staging_before_production: bool,
    via: str = "",
) -> PromotionPolicy:
    policy, _ = PromotionPolicy.objects.select_for_update().get_or_create(
        tenant=tenant, model_kind=model_kind, defaults={"gates": [dict(g) for g in DEFAULT_GATES]}
    )
    before = {
        "gates": policy.gates,
        "max_regression_vs_champion": policy.max_regression_vs_champion,
        "latency_budget_ms": policy.latency_budget_ms,
        "require_staging_before_production": policy.require_staging_before_production,
    }
    policy.gates = gates
    policy.max_regression_vs_champion = max_regression_vs_champion
    policy.latency_budget_ms = latency_budget_ms
    policy.require_staging_before_production = require_staging_before_production
    policy.updated_by = actor
    policy.save()
    after = {
        "gates": gates,
        "max_regression_vs_champion": max_regression_vs_champion,
        "latency_budget_ms": latency_budget_ms,
        "require_staging_before_production": require_staging_before_production,
    }
    audit_record(
        actor=actor,
        tenant=tenant,
        verb="policy.update",
        obj=policy,
        object_id=model_kind,
        before=before,
        after=after,
        via=via,
    )
    return policy
