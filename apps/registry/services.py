"""Writes for registered models and their versions."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.db.models import Max

from apps.audit.services import audit_record
from apps.registry.models import ModelKind, ModelVersion, RegisteredModel


@transaction.atomic
def model_version_create(
    *,
    run: Any,
    artifact_key: str,
    sha256: str,
    size_bytes: int,
    memory_bytes: int,
    predictions_key: str,
    labels: list[str],
    metrics: dict[str, Any],
    mlflow_version: str = "",
) -> ModelVersion:
    """Register the model a run produced. A run has at most one version (one-to-one)."""
    existing = ModelVersion.objects.filter(run=run).first()
    if existing is not None:
        return existing
    model, _ = RegisteredModel.objects.get_or_create(
        tenant=run.tenant, name=run.model_name, defaults={"kind": ModelKind.CLASSIFIER}
    )
    # Lock the model row: two runs finishing together must not take the same number.
    RegisteredModel.objects.select_for_update().get(pk=model.pk)
    number = (model.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    version = ModelVersion.objects.create(
        registered_model=model,
        number=number,
        run=run,
        artifact_key=artifact_key,
        sha256=sha256,
        size_bytes=size_bytes,
        memory_bytes=memory_bytes,
        predictions_key=predictions_key,
        labels=labels,
        metrics=metrics,
        mlflow_version=mlflow_version,
    )
    audit_record(
        actor=None,
        tenant=run.tenant,
        verb="model_version.create",
        obj=version,
        after={
            "model": model.name,
            "number": number,
            "sha256": sha256,
            "size_bytes": size_bytes,
            "run": run.pk,
        },
        via="task",
    )
    return version
