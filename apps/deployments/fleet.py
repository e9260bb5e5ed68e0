"""The workbench's side of the fleet: push the desired state, watch what really runs,
route predictions.

The database is the source of truth for what should be live; :func:`pool_apply` sends a
pool's whole desired content to the backend, which only ever makes the fleet match it.
:func:`fleet_check` (Celery beat) compares what the backend reports with what it saw last
time: a replica that came back is re-warmed, one that keeps restarting or a model that keeps
failing to load raises an alert, and a deployment whose loading task died is taken up again.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.core.errors import DomainError
from apps.deployments import alerts, selectors
from apps.deployments.backends import get_backend, pool_spec
from apps.deployments.models import (
    ACTIVE,
    AlertKind,
    Deployment,
    DeploymentStatus,
    ServingPool,
    WarmupTrigger,
)
from apps.registry.models import RegisteredModel
from apps.tenants.models import Tenant
from worker.serving.specs import Placement

log = logging.getLogger(__name__)

RESTART_WINDOW_SECONDS = 3600


def pool_for(kind: str) -> ServingPool:
    """The pool of a model kind, created with the settings' capacity on first use."""
    defaults = {
        "replica_memory_bytes": settings.SERVING_REPLICA_MEMORY_BYTES,
        "max_sets": settings.SERVING_MAX_SETS,
        "tail_memory_bytes": settings.SERVING_TAIL_MEMORY_BYTES,
        "min_replicas": settings.SERVING_MIN_REPLICAS,
        "max_replicas": settings.SERVING_MAX_REPLICAS,
    }
    try:
        with transaction.atomic():
            return ServingPool.objects.get_or_create(kind=kind, defaults=defaults)[0]
    except IntegrityError:  # created by a concurrent caller
        return ServingPool.objects.get(kind=kind)


def pool_apply(*, kind: str) -> Placement:
    """Make the backend serve exactly the pool's desired models.

    The pool row stays locked while the backend applies, so two changes of one pool never
    interleave; on InsufficientCapacity the backend changed nothing and neither do we.
    """
    pool_for(kind)
    with transaction.atomic():
        pool = ServingPool.objects.select_for_update().get(kind=kind)
        models = selectors.desired_models(kind)
        placement = get_backend().apply(
            pool_spec(pool),
            models,
            previous={str(k): int(v) for k, v in pool.placement.items()},
        )
        pool.placement = placement.assignment
        pool.applied_at = timezone.now()
        pool.save(update_fields=["placement", "applied_at"])
        active = Deployment.objects.filter(
            model_version__registered_model__kind=kind, status__in=ACTIVE
        )
        for deployment in active.only("pk", "model_version_id", "replica_set"):
            replica_set = placement.assignment.get(deployment.model_version_id)
            if deployment.replica_set != replica_set:
                Deployment.objects.filter(pk=deployment.pk).update(replica_set=replica_set)
    if placement.moved:
        log.info("placement moved models", extra={"pool": kind, "moved": placement.moved})
    return placement


def _replicas(pool_status: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    sets = list(pool_status.get("sets", []))
    if pool_status.get("tail"):
        sets.append(pool_status["tail"])
    return [(str(s.get("name")), r) for s in sets for r in s.get("replicas", [])]


def _model_entries(replica: dict[str, Any]) -> list[dict[str, Any]]:
    """A replica's models as dicts: Ray replicas report a dict per model, SageMaker only
    model ids."""
    return [
        raw if isinstance(raw, dict) else {"model_id": str(raw)}
        for raw in replica.get("models", [])
        if (raw.get("model_id") if isinstance(raw, dict) else raw)
    ]


def fleet_check() -> dict[str, int]:
    """Notice restarted replicas (re-warm them), restart loops and load failures (alert),
    and deployments whose loading task died (load them again)."""
    from apps.deployments.tasks import load_deployment, warm_deployment

    resumed = 0
    stale = timezone.now() - timedelta(seconds=settings.DEPLOYMENT_LEASE_SECONDS)
    for deployment_id in Deployment.objects.filter(
        status=DeploymentStatus.LOADING, claimed_at__lt=stale
    ).values_list("pk", flat=True):
        load_deployment.delay(deployment_id)
        resumed += 1
    if not ServingPool.objects.exists():
        return {"resumed": resumed, "rewarmed": 0, "alerts": 0}
    status = get_backend().status()
    rewarm: set[str] = set()
    raised = 0
    for pool_status in status.get("pools", []):
        pool = ServingPool.objects.filter(kind=pool_status.get("kind")).first()
        if pool is None:
            continue
        seen: dict[str, Any] = pool.replicas_seen or {}
        known: dict[str, str] = seen.get("replicas", {})
        restarts: dict[str, list[float]] = seen.get("restarts", {})
        now_replicas: dict[str, str] = {}
        now = time.time()
        for set_name, replica in _replicas(pool_status):
            replica_id = str(replica.get("replica_id"))
            now_replicas[replica_id] = set_name
            models = _model_entries(replica)
            if known and replica_id not in known:
                # A replica we have not seen: a restart or a scale-up; either way it must
                # prove it answers correctly before customers find out it does not.
                rewarm.update(str(m["model_id"]) for m in models)
            for model in models:
                if model.get("error"):
                    raised += _alert_for_model(
                        str(model["model_id"]),
                        AlertKind.LOAD_FAILING,
                        f"model {model['model_id']} fails to load on replica {replica_id}: "
                        f"{model['error']}",
                    )
        for replica_id, set_name in known.items():
            if replica_id not in now_replicas and set_name in now_replicas.values():
                restarts.setdefault(set_name, []).append(now)
        for set_name, times in list(restarts.items()):
            recent = [t for t in times if now - t < RESTART_WINDOW_SECONDS]
            restarts[set_name] = recent
            if len(recent) >= settings.FLEET_RESTART_ALERT_COUNT:
                for model_id in _models_of_set(pool_status, set_name):
                    raised += _alert_for_model(
                        model_id,
                        AlertKind.REPLICA_RESTARTING,
                        f"replica set {set_name} restarted {len(recent)} times in the last hour",
                    )
        pool.replicas_seen = {"replicas": now_replicas, "restarts": restarts}
        pool.save(update_fields=["replicas_seen"])
    warm = Deployment.objects.filter(status=DeploymentStatus.WARM, model_version_id__in=rewarm)
    for deployment_id in warm.values_list("pk", flat=True):
        warm_deployment.delay(deployment_id, WarmupTrigger.REPLICA_RESTART)
    return {"resumed": resumed, "rewarmed": len(rewarm), "alerts": raised}


def _models_of_set(pool_status: dict[str, Any], set_name: str) -> set[str]:
    return {
        str(m["model_id"])
        for name, replica in _replicas(pool_status)
        if name == set_name
        for m in _model_entries(replica)
    }


def _alert_for_model(model_id: str, kind: str, message: str) -> int:
    raised = 0
    for deployment in Deployment.objects.filter(
        model_version_id=model_id, status__in=ACTIVE
    ).select_related("tenant"):
        alerts.alert_raise(
            tenant=deployment.tenant, deployment=deployment, kind=kind, message=message
        )
        raised += 1
    return raised


def predict(
    *, tenant: Tenant, model: RegisteredModel, inputs: list[str], environment: str
) -> dict[str, Any]:
    """Route a tenant's request to the warm deployment of its model's environment."""
    warm, latest = selectors.serving_deployment(tenant=tenant, model=model, environment=environment)
    if warm is None:
        state = latest.status if latest is not None else "not_deployed"
        raise DomainError(
            f"{model.name} has no warm deployment in {environment} (status: {state}).",
            code="not_warm",
            status=state,
        )
    started = time.perf_counter()
    result = get_backend().predict(model.kind, warm.model_version_id, inputs)
    return {
        "model_version": warm.model_version_id,
        "version": warm.model_version.number,
        "environment": environment,
        "outputs": result.outputs,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def fleet_status_for(user: Any) -> dict[str, Any]:
    """The backend's status, with other tenants' models hidden from a non-staff user (they
    see that memory is used, not by whom)."""
    status = get_backend().status()
    visible = _visible_models(user)
    see_all = bool(user.is_staff)
    pools_db = {p.kind: p for p in ServingPool.objects.all()}
    for pool_status in status.get("pools", []):
        pool = pools_db.get(pool_status.get("kind"))
        if pool is not None:
            pool_status["capacity"] = {
                "replica_memory_bytes": pool.replica_memory_bytes,
                "max_sets": pool.max_sets,
                "tail_memory_bytes": pool.tail_memory_bytes,
                "min_replicas": pool.min_replicas,
                "max_replicas": pool.max_replicas,
            }
        for group in [*pool_status.get("sets", []), pool_status.get("tail") or {}]:
            if "models" in group and not see_all:
                ids = [m for m in group["models"] if str(m) in visible]
                group["other_tenants_models"] = len(group["models"]) - len(ids)
                group["models"] = ids
        for _, replica in _replicas(pool_status):
            shown = []
            hidden_bytes = hidden = 0
            for entry in _model_entries(replica):
                info = visible.get(str(entry.get("model_id")))
                if info is None and not see_all:
                    if entry.get("loaded", True):  # the tail lists models asked for, too
                        hidden += 1
                        hidden_bytes += int(entry.get("memory_bytes") or 0)
                    continue
                shown.append({**entry, **(info or {})})
            replica["models"] = shown
            replica["other_tenants_models"] = hidden
            replica["other_tenants_memory_bytes"] = hidden_bytes
    return status


def _visible_models(user: Any) -> dict[str, dict[str, Any]]:
    """Model version id -> who owns it, for the deployments the user may see."""
    rows = Deployment.objects.filter(status__in=[*ACTIVE, DeploymentStatus.RETIRED])
    if not user.is_staff:
        rows = rows.filter(tenant__memberships__user=user)
    info: dict[str, dict[str, Any]] = {}
    for dep in rows.select_related("tenant", "model_version__registered_model"):
        entry = info.setdefault(
            dep.model_version_id,
            {
                "tenant": dep.tenant.slug,
                "model": dep.model_version.registered_model.name,
                "version": dep.model_version.number,
                "deployments": [],
            },
        )
        if dep.status != DeploymentStatus.RETIRED or dep.standby:
            entry["deployments"].append(
                {"id": dep.pk, "environment": dep.environment, "status": dep.status}
            )
    return info
