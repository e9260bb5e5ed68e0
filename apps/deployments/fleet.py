"""The workbench's side of the fleet: push the desired state, route predictions, show
the fleet.

The database is the source of truth for what should be live; :func:`pool_apply` (called by
the fleet controller only) sends a pool's whole desired content to the backend, which only
ever makes the fleet match it. :func:`predict` and :func:`fleet_status_for` run in web and
worker processes and never touch the backend: they read what the controller published.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.core.errors import DomainError
from apps.deployments import selectors
from apps.deployments.backends import pool_spec
from apps.deployments.dataplane import FleetUnavailable, data_plane
from apps.deployments.models import (
    ACTIVE,
    Deployment,
    DeploymentStatus,
    FleetLease,
    ServingPool,
)
from apps.registry.models import RegisteredModel
from apps.tenants.models import Tenant
from worker import base_models
from worker.serving.specs import Placement, ServingBackend

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
AUTOCOMPLETE = "autocomplete"


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


def pool_apply(*, kind: str, backend: ServingBackend) -> Placement:
    """Make the backend serve exactly the pool's desired models (the fleet controller's).

    The pool row stays locked while the backend applies, so two changes of one pool never
    interleave; on InsufficientCapacity the backend changed nothing and neither do we.
    """
    pool_for(kind)
    with transaction.atomic():
        pool = ServingPool.objects.select_for_update().get(kind=kind)
        models = selectors.desired_models(kind)
        placement = backend.apply(
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


def replicas_of(pool_status: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    sets = list(pool_status.get("sets", []))
    if pool_status.get("tail"):
        sets.append(pool_status["tail"])
    return [(str(s.get("name")), r) for s in sets for r in s.get("replicas", [])]


def model_entries(replica: dict[str, Any]) -> list[dict[str, Any]]:
    """A replica's models as dicts: Ray replicas report a dict per model, SageMaker only
    model ids."""
    return [
        raw if isinstance(raw, dict) else {"model_id": str(raw)}
        for raw in replica.get("models", [])
        if (raw.get("model_id") if isinstance(raw, dict) else raw)
    ]


def _warm(*, tenant: Tenant, model: RegisteredModel, environment: str) -> Deployment:
    warm, latest = selectors.serving_deployment(tenant=tenant, model=model, environment=environment)
    if warm is None:
        state = latest.status if latest is not None else "not_deployed"
        raise DomainError(
            f"{model.name} has no warm deployment in {environment} (status: {state}).",
            code="not_warm",
            status=state,
        )
    return warm


def predict(
    *, tenant: Tenant, model: RegisteredModel, inputs: list[str], environment: str
) -> dict[str, Any]:
    """Route a tenant's request to the warm deployment of its model's environment."""
    if model.kind == EMBEDDING:
        raise DomainError(
            f"{model.name} is an embedding model: it answers embed and search, not predict.",
            code="not_a_classifier",
        )
    if model.kind == AUTOCOMPLETE:
        raise DomainError(
            f"{model.name} is an autocomplete model: it answers complete, not predict.",
            code="not_a_classifier",
        )
    warm = _warm(tenant=tenant, model=model, environment=environment)
    started = time.perf_counter()
    result = data_plane().predict(model.kind, warm.model_version_id, inputs)
    return {
        "model_version": warm.model_version_id,
        "version": warm.model_version.number,
        "environment": environment,
        "outputs": result.outputs,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def _embedding_plane(model: RegisteredModel) -> Any:
    if model.kind != EMBEDDING:
        raise DomainError(
            f"{model.name} is a {model.kind} model; embed and search need an embedding model.",
            code="not_embedding",
        )
    plane = data_plane()
    if not hasattr(plane, "search"):
        raise DomainError(
            "This workbench's serving backend does not serve embedding models.",
            code="not_supported",
        )
    return plane


def embed(
    *, tenant: Tenant, model: RegisteredModel, inputs: list[str], role: str, environment: str
) -> dict[str, Any]:
    """The L2-normalised embeddings of ``inputs`` by the warm deployment of the tenant's
    embedding model (its query or its document encoder)."""
    plane = _embedding_plane(model)
    warm = _warm(tenant=tenant, model=model, environment=environment)
    started = time.perf_counter()
    reply = plane.embed(model.kind, warm.model_version_id, inputs, role)
    return {
        "embeddings": reply["embeddings"],
        "dim": reply["dim"],
        "role": role,
        "model_version": warm.model_version_id,
        "version": warm.model_version.number,
        "environment": environment,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def search(
    *, tenant: Tenant, model: RegisteredModel, query: str, k: int, environment: str
) -> dict[str, Any]:
    """The ``k`` documents of the deployment's knowledge base nearest to ``query``."""
    from worker.serving.routing import IndexNotHere

    plane = _embedding_plane(model)
    warm = _warm(tenant=tenant, model=model, environment=environment)
    started = time.perf_counter()
    try:
        reply = plane.search(model.kind, warm.model_version_id, query, k)
    except IndexNotHere as error:  # a replica between two indexes: a moment, not a fault
        raise FleetUnavailable(f"The model's index is not loaded right now: {error}.") from error
    return {
        "results": reply["results"],
        "k": k,
        "index_sha256": warm.index_sha256,
        "dataset_version": warm.index_dataset_version_id,
        "model_version": warm.model_version_id,
        "version": warm.model_version.number,
        "environment": environment,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def complete(
    *, tenant: Tenant, model: RegisteredModel, environment: str, **request: Any
) -> dict[str, Any]:
    """Completions of a reply's prefix by the warm deployment of the tenant's autocomplete
    model (``request``: the REST body's fields, already checked: ``prefix``, ``context``,
    ``max_tokens``, ``n``, ``strategy``, ``top_k``, ``seed``, ``session``)."""
    if model.kind != AUTOCOMPLETE:
        raise DomainError(
            f"{model.name} is a {model.kind} model; complete needs an autocomplete model.",
            code="not_autocomplete",
        )
    plane = data_plane()
    if not hasattr(plane, "complete"):
        raise DomainError(
            "This workbench's serving backend does not serve autocomplete models.",
            code="not_supported",
        )
    warm = _warm(tenant=tenant, model=model, environment=environment)
    started = time.perf_counter()
    reply = plane.complete(model.kind, warm.model_version_id, **request)
    return {
        "model": model.name,
        "model_version": warm.model_version_id,
        "version": warm.model_version.number,
        "environment": environment,
        "completions": reply["completions"],
        "cached_tokens": int(reply.get("cached_tokens", 0)),
        "latency_ms": round((time.perf_counter() - started) * 1000, 3),
    }


def published_status() -> dict[str, Any]:
    """The fleet as the controller last saw it: every pool's status, when it was seen, and
    whether a controller holds its lease (never asks the backend: pages stay fast)."""
    now = timezone.now()
    pools = list(ServingPool.objects.order_by("kind"))
    lease = FleetLease.objects.filter(pk="fleet").first()
    seen = [p.observed_at for p in pools if p.observed_at is not None]
    published = max(seen) if seen else None
    return {
        "pools": [dict(p.observed) for p in pools if p.observed],
        "published_at": published.isoformat() if published else None,
        "age_seconds": round((now - published).total_seconds(), 1) if published else None,
        "controller": {
            "holder": lease.holder if lease else "",
            "alive": bool(lease and lease.expires_at and lease.expires_at > now),
            "heartbeat_at": lease.heartbeat_at.isoformat()
            if lease and lease.heartbeat_at
            else None,
            "last_error": lease.last_error if lease else "",
        },
    }


def fleet_status_for(user: Any) -> dict[str, Any]:
    """The published fleet status, with other tenants' models hidden from a non-staff user
    (they see that memory is used, not by whom). Each replica lists the shared bases it
    holds (``bases``, empty where it holds none or publishes none) and each model shown
    its ``format`` and ``base_sha256``."""
    status = published_status()
    if not user.is_staff:
        status["controller"]["last_error"] = ""
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
        # SageMaker's replicas list model ids; the models' details are the pool's.
        details = {
            str(m.get("model_id")): m
            for m in _list(pool_status.get("models"))
            if isinstance(m, dict)
        }
        if "models" in pool_status and not see_all:
            pool_status["models"] = [m for key, m in details.items() if key in visible]
        for group in [*pool_status.get("sets", []), pool_status.get("tail") or {}]:
            if "models" in group and not see_all:
                ids = [m for m in group["models"] if str(m) in visible]
                group["other_tenants_models"] = len(group["models"]) - len(ids)
                group["models"] = ids
        for _, replica in replicas_of(pool_status):
            shown = []
            hidden_bytes = hidden = 0
            for listed in model_entries(replica):
                entry = {**details.get(str(listed.get("model_id")), {}), **listed}
                info = visible.get(str(entry.get("model_id")))
                if info is None and not see_all:
                    if entry.get("loaded", True):  # the tail lists models asked for, too
                        hidden += 1
                        hidden_bytes += int(entry.get("memory_bytes") or 0)
                    continue
                # The registry's format and base where it knows the version (older
                # replicas and SageMaker's, which list model ids, say nothing of them).
                shown.append({"format": "full", "base_sha256": "", **entry, **(info or {})})
            replica["models"] = shown
            replica["other_tenants_models"] = hidden
            replica["other_tenants_memory_bytes"] = hidden_bytes
            # A base is shared weights, not a tenant's: its name, bytes and how many
            # adapters use it are shown to all; which adapters is shown through the models.
            replica["bases"] = [_base_entry(raw) for raw in _list(replica.get("bases"))]
    return status


def _base_entry(raw: Any) -> dict[str, Any]:
    """A base a replica holds, with the shared weights' name from the catalogue. Only the
    known keys pass, so nothing a replica adds later reaches other tenants unread."""
    base = raw if isinstance(raw, dict) else {}
    base_model = str(base.get("base_model") or "")
    try:
        name = base_models.get(base_model).base or base_model
    except base_models.UnknownBaseModel:  # a base since taken out of the catalogue
        name = base_model
    return {
        "base_model": base_model,
        "name": name,
        "sha256": str(base.get("sha256") or ""),
        "memory_bytes": _count(base.get("memory_bytes")),
        "adapters": _count(base.get("adapters")),
    }


def _count(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


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
                "format": dep.model_version.format,
                "base_sha256": dep.model_version.base_sha256,
                "deployments": [],
            },
        )
        if dep.status != DeploymentStatus.RETIRED or dep.standby:
            entry["deployments"].append(
                {"id": dep.pk, "environment": dep.environment, "status": dep.status}
            )
    return info
