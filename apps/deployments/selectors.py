"""Reads: what the fleet should hold, what serves a tenant's model, warm-up samples."""

from __future__ import annotations

import json
from typing import Any

from django.db.models import Q, QuerySet

from apps.core import rawsql
from apps.core.artifacts import get_store
from apps.deployments.models import ACTIVE, SERVING, Deployment, DeploymentStatus
from apps.evaluation.models import EvalStatus, Evaluation
from apps.registry.models import ModelVersion, RegisteredModel
from apps.tenants.models import Tenant
from worker.serving.specs import ModelSpec


def deployments_for(tenant: Tenant) -> QuerySet[Deployment]:
    return Deployment.objects.filter(tenant=tenant).select_related(
        "model_version__registered_model", "created_by", "promotion"
    )


def fleet_deployments(kind: str) -> QuerySet[Deployment]:
    """Every deployment whose model the pool of ``kind`` must hold: the active ones, and
    the standbys kept loaded for a quick rollback."""
    return Deployment.objects.filter(
        Q(status__in=ACTIVE) | Q(status=DeploymentStatus.RETIRED, standby=True),
        model_version__registered_model__kind=kind,
    )


def fleet_deployments_all() -> QuerySet[Deployment]:
    """Every deployment the fleet must hold, of any kind."""
    return Deployment.objects.filter(
        Q(status__in=ACTIVE) | Q(status=DeploymentStatus.RETIRED, standby=True)
    )


def desired_models(kind: str) -> list[ModelSpec]:
    """The whole desired content of a pool, as the backend gets it: production models are
    pinned (placed and preloaded); staging models and standbys live in the long tail."""
    rows = fleet_deployments(kind).select_related("model_version")
    store = get_store()
    by_version: dict[str, ModelSpec] = {}
    for deployment in rows.order_by("created_at"):
        version = deployment.model_version
        # An embedding deployment is held once its index is built; its searches use that
        # index, and during a reindex the staged one is loaded beside it. (Two deployments
        # of one version share its replicas' copy: the later one's index is searched.)
        indexed = kind != "embedding" or bool(deployment.index_sha256)
        if not indexed:
            continue
        earlier = by_version.get(version.pk)
        pinned = deployment.pinned or (earlier is not None and earlier.pinned)
        index: dict[str, str] = {}
        if deployment.index_sha256:
            index = {
                "index_uri": store.uri(deployment.index_key),
                "index_sha256": deployment.index_sha256,
            }
        if deployment.staged_index_sha256:
            index["staged_index_uri"] = store.uri(deployment.staged_index_key)
            index["staged_index_sha256"] = deployment.staged_index_sha256
        by_version[version.pk] = ModelSpec(
            model_id=version.pk,
            artifact_uri=store.uri(version.artifact_key),
            sha256=deployment.artifact_sha256,
            memory_bytes=version.memory_bytes
            + deployment.index_size_bytes
            + deployment.staged_index_size_bytes,
            pinned=pinned,
            # An adapter's shared base (placement counts it once per replica set); ""/0 for
            # a full model.
            base_sha256=version.base_sha256,
            base_memory_bytes=version.base_memory_bytes,
            **index,
        )
    return sorted(by_version.values(), key=lambda spec: spec.model_id)


def serving_deployment(
    *, tenant: Tenant, model: RegisteredModel, environment: str
) -> tuple[Deployment | None, Deployment | None]:
    """(the warm deployment that serves the model's environment, the latest deployment of
    it whatever its status) — the second one explains a 409 when nothing is warm.

    On every predict: one query (written out, see ``apps.core.rawsql``) when the warm
    deployment is among the latest ten."""
    d = rawsql.Part(Deployment, "d")
    v = rawsql.Part(ModelVersion, "v", attach=(0, "model_version"))
    created = rawsql.column(Deployment, "created_at")
    rows = rawsql.fetch(
        [d, v],
        f"FROM {rawsql.table(Deployment)} d {rawsql.join(v, d, 'model_version')} "
        f"WHERE {rawsql.equals(d, 'tenant', 'environment')} "
        f"AND {rawsql.equals(v, 'registered_model')} "
        f"ORDER BY d.{created} DESC, d.{rawsql.column(Deployment, 'id')} DESC LIMIT 10",
        [tenant.pk, environment, model.pk],
    )
    recent: list[Deployment] = [row[0] for row in rows]  # type: ignore[misc]
    # A degraded deployment is tried too: the fleet may serve it again before the
    # controller's next look; if not, the caller gets a quick 503.
    warm = next((dep for dep in recent if dep.status in SERVING), None)
    if warm is None and len(recent) == 10:
        warm = (
            Deployment.objects.filter(
                tenant=tenant,
                model_version__registered_model=model,
                environment=environment,
                status__in=SERVING,
            )
            .select_related("model_version")
            .order_by("-created_at")
            .first()
        )
    return warm, (recent[0] if recent else None)


def registered_model(*, tenant: Tenant, name: str) -> RegisteredModel | None:
    """The tenant's model called ``name`` (one query, written out: every predict makes it)."""
    m = rawsql.Part(RegisteredModel, "m")
    rows = rawsql.fetch(
        [m],
        f"FROM {rawsql.table(RegisteredModel)} m WHERE {rawsql.equals(m, 'tenant', 'name')}",
        [tenant.pk, name],
    )
    return rows[0][0] if rows else None  # type: ignore[return-value]


def current_deployment(version: ModelVersion, environment: str) -> Deployment | None:
    """The warm (or degraded) deployment of the version's model in ``environment``."""
    return (
        Deployment.objects.filter(
            model_version__registered_model=version.registered_model_id,
            environment=environment,
            status__in=SERVING,
        )
        .order_by("-warm_at")
        .first()
    )


def rollback_target(deployment: Deployment) -> Deployment | None:
    """The deployment this one replaced, or the latest earlier one of another version."""
    earlier = Deployment.objects.filter(
        model_version__registered_model=deployment.model_version.registered_model_id,
        environment=deployment.environment,
        warm_at__isnull=False,
        created_at__lt=deployment.created_at,
    ).exclude(model_version=deployment.model_version_id)
    if deployment.replaces_id is not None:
        replaced = earlier.filter(pk=deployment.replaces_id).first()
        if replaced is not None:
            return replaced
    return earlier.order_by("-created_at").first()


def warmup_samples(version: ModelVersion, limit: int) -> list[dict[str, Any]]:
    """Inputs of the tenant's own golden sets and the predictions the evaluation recorded
    for them; for a version evaluated before samples were kept, its validation predictions.

    Never a shared (staff-owned) set's rows: a warm-up's mismatches show their text to the
    tenant (API, dashboard, alerts, e-mails), and tenants may not read shared sets."""
    evaluation = (
        Evaluation.objects.filter(
            model_version=version,
            status=EvalStatus.SUCCEEDED,
            artifact_sha256=version.sha256,
            dataset_version__dataset__tenant_id=version.registered_model.tenant_id,
        )
        .exclude(samples=[])
        .order_by("-finished_at")
        .first()
    )
    if evaluation is not None:
        return list(evaluation.samples[:limit])
    samples: list[dict[str, Any]] = []
    if version.predictions_key:
        with get_store().open(version.predictions_key) as fh:
            for line in fh:
                if len(samples) >= limit:
                    break
                row = json.loads(line)
                samples.append(
                    {"text": row["text"], "predicted": row["predicted"], "score": row["score"]}
                )
    return samples


def embedding_warmup_queries(
    version: ModelVersion, limit: int, *, documents_sha256: str = ""
) -> list[dict[str, Any]]:
    """Golden queries with the embeddings the version's evaluation recorded for them (the
    tenant's own sets only, as :func:`warmup_samples`): ``[{"query", "embedding",
    "document_ids"}]``, ``document_ids`` (its top 10) only where the golden set's knowledge
    base is ``documents_sha256`` (the index's: only then are the rankings comparable); []
    where the evaluation kept none."""
    evaluations = Evaluation.objects.filter(
        model_version=version,
        status=EvalStatus.SUCCEEDED,
        artifact_sha256=version.sha256,
        dataset_version__dataset__tenant_id=version.registered_model.tenant_id,
    ).order_by("-finished_at")
    for evaluation in evaluations[:5]:
        metrics = evaluation.metrics if isinstance(evaluation.metrics, dict) else {}
        same = bool(documents_sha256) and metrics.get("documents_sha256") == documents_sha256
        found = [
            {
                "query": str(s["query"]),
                "embedding": list(s["embedding"]),
                "document_ids": [str(i) for i in s.get("document_ids") or []] if same else [],
            }
            for s in (evaluation.samples or [])
            if isinstance(s, dict) and s.get("query") and s.get("embedding")
        ]
        if found:
            return found[:limit]
    return []
