"""Reads for the deployments and fleet pages: what is live per model and environment, the
list with its open-alert counts, one deployment's history, warm-ups by deployment.

Every query that takes a tenant stays inside it; ``last_warmups`` only reads the ids the
fleet status already showed the user (``apps.deployments.fleet.fleet_status_for`` filters
them by membership).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count, OuterRef, Q, QuerySet, Subquery

from apps.audit.models import AuditEvent
from apps.audit.selectors import audit_events_for_tenant
from apps.deployments.models import Deployment, DeploymentStatus, Environment, FleetAlert
from apps.deployments.selectors import deployments_for
from apps.tenants.models import Tenant

ENVIRONMENT_ORDER = {Environment.PRODUCTION.value: 0, Environment.STAGING.value: 1}


def deployments_listed(tenant: Tenant) -> QuerySet[Deployment]:
    """The tenant's deployments, newest first, each with its number of open alerts."""
    # Explicit order: Meta.ordering does not apply to a query with GROUP BY.
    return (
        deployments_for(tenant)
        .annotate(open_alerts=Count("alerts", filter=Q(alerts__resolved_at__isnull=True)))
        .order_by("-created_at", "-id")
    )


def deployed_model_names(tenant: Tenant) -> list[str]:
    names = (
        deployments_for(tenant)
        .order_by()
        .values_list("model_version__registered_model__name", flat=True)
        .distinct()
    )
    return sorted(names)


@dataclass(frozen=True)
class LiveRow:
    """One model in one environment: the deployment serving it (``warm``, None when nothing
    serves) and the latest deployment whatever its status (loading, failed...)."""

    model: str
    environment: str
    warm: Deployment | None
    latest: Deployment
    open_alerts: int

    @property
    def changing(self) -> bool:
        """A newer deployment than the one serving is on its way, or failed."""
        return self.warm is None or self.latest.pk != self.warm.pk


def live_overview(tenant: Tenant) -> list[LiveRow]:
    """Per model and environment that ever had a deployment: what serves now. Three
    queries, whatever the number of deployments."""
    latest_of_pair = (
        Deployment.objects.filter(
            tenant=tenant,
            model_version__registered_model=OuterRef("model_version__registered_model"),
            environment=OuterRef("environment"),
        )
        .order_by("-created_at", "-id")
        .values("pk")[:1]
    )
    latest_ids = (
        Deployment.objects.filter(tenant=tenant)
        .order_by()
        .annotate(latest_id=Subquery(latest_of_pair))
        .values_list("latest_id", flat=True)
        .distinct()
    )
    base = deployments_listed(tenant).select_related("model_version__registered_model")
    rows = list(
        base.filter(Q(pk__in=Subquery(latest_ids)) | Q(status=DeploymentStatus.WARM)).order_by(
            "-created_at", "-id"
        )
    )
    latest: dict[tuple[str, str], Deployment] = {}
    warm: dict[tuple[str, str], Deployment] = {}
    alerts: dict[tuple[str, str], int] = {}
    for deployment in rows:  # newest first: the first seen of a pair is its latest
        key = (deployment.model_version.registered_model.name, deployment.environment)
        latest.setdefault(key, deployment)
        if deployment.status == DeploymentStatus.WARM:
            warm.setdefault(key, deployment)
    for model, environment, count in (
        FleetAlert.objects.filter(tenant=tenant, resolved_at__isnull=True)
        .exclude(deployment=None)
        .values_list("deployment__model_version__registered_model__name", "deployment__environment")
        .annotate(n=Count("pk"))
        .values_list(
            "deployment__model_version__registered_model__name", "deployment__environment", "n"
        )
    ):
        alerts[(model, environment)] = int(count)
    return [
        LiveRow(
            model=key[0],
            environment=key[1],
            warm=warm.get(key),
            latest=latest[key],
            open_alerts=alerts.get(key, 0),
        )
        for key in sorted(latest, key=lambda k: (k[0], ENVIRONMENT_ORDER.get(k[1], 9), k[1]))
    ]


def tenant_alerts_open(tenant: Tenant) -> QuerySet[FleetAlert]:
    return FleetAlert.objects.filter(tenant=tenant, resolved_at__isnull=True).select_related(
        "deployment__model_version__registered_model"
    )


def deployment_history(deployment: Deployment) -> QuerySet[AuditEvent]:
    """Audit events of the deployment, oldest first (its status changes and who asked)."""
    return (
        audit_events_for_tenant(tenant=deployment.tenant)
        .filter(object_id=deployment.pk)
        .select_related("actor")
        .order_by("created_at", "id")
    )


def replaced_by(deployment: Deployment) -> QuerySet[Deployment]:
    """Deployments made to replace this one (a newer version, or a rollback)."""
    return (
        deployments_for(deployment.tenant)
        .filter(replaces=deployment)
        .select_related("model_version__registered_model")
        .order_by("created_at")
    )


def last_warmups(deployment_ids: Iterable[str]) -> dict[str, tuple[datetime | None, float | None]]:
    """Deployment id -> (its last warm-up's time, median latency in ms)."""
    rows = Deployment.objects.filter(pk__in=list(deployment_ids)).values_list(
        "pk", "last_warmup_at", "last_warmup_ms"
    )
    return {pk: (at, ms) for pk, at, ms in rows}
