"""Deployment tasks: thin, safe to repeat — they take ids and call services."""

from __future__ import annotations

from celery import shared_task

from apps.deployments import fleet, services
from apps.deployments.models import Deployment, DeploymentStatus, WarmupTrigger


# acks_late: a worker killed mid-load leaves the message to be delivered again, and the
# claim (pending, or loading with an expired lease) makes the second delivery safe.
@shared_task(
    name="deployments.load",
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=900,
    time_limit=960,
)
def load_deployment(deployment_id: str) -> str | None:
    deployment = services.deployment_load(deployment_id=deployment_id)
    return deployment.status if deployment else None


@shared_task(name="deployments.warm", soft_time_limit=300, time_limit=360)
def warm_deployment(deployment_id: str, trigger: str = WarmupTrigger.SCHEDULE) -> bool | None:
    warmup = services.warm_deployment(deployment_id=deployment_id, trigger=trigger)
    return warmup.ok if warmup else None


@shared_task(name="deployments.apply_pool", soft_time_limit=600, time_limit=660)
def apply_pool(kind: str) -> dict[str, int]:
    placement = fleet.pool_apply(kind=kind)
    return {"models": len(placement.assignment), "moved": len(placement.moved)}


@shared_task(name="deployments.rewarm_all", soft_time_limit=60, time_limit=90)
def rewarm_all() -> int:
    """Beat: re-warm every warm deployment on the schedule."""
    ids = list(Deployment.objects.filter(status=DeploymentStatus.WARM).values_list("pk", flat=True))
    for deployment_id in ids:
        warm_deployment.delay(deployment_id, WarmupTrigger.SCHEDULE)
    return len(ids)


@shared_task(name="deployments.check_fleet", soft_time_limit=60, time_limit=90)
def check_fleet() -> dict[str, int]:
    return fleet.fleet_check()
