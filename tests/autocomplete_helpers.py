"""Autocomplete deployments through the workbench's services, shared by the API, fleet and
browser tests: a reply corpus (a text-generation dataset version, stored) and registered
autocomplete model versions of the tiny packed GPT-2 of
``tests/worker/serving/autocomplete_models.py``."""

from __future__ import annotations

import csv
import hashlib
import io
import tempfile
from pathlib import Path
from typing import Any

from apps.core.artifacts import get_store
from apps.datasets.models import Dataset, DatasetVersion
from apps.registry.models import ModelVersion, RegisteredModel
from apps.registry.services import model_version_create
from apps.tenants.models import Tenant
from apps.training.models import TrainingRun
from tests.worker.serving.autocomplete_models import (
    REPLIES,
    PackedCompleter,
    completer_of,
    tiny_autocomplete,
)

__all__ = ["REPLIES", "PackedCompleter", "completer_of", "tiny_autocomplete"]


def _put(key: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "file"
        path.write_bytes(content)
        get_store().put_file(key, path)


def reply_version(
    tenant: Tenant, name: str = "replies", replies: list[tuple[str, str]] | None = None
) -> DatasetVersion:
    """A text-generation dataset version of ``tenant`` (context and text columns, stored)."""
    rows = replies if replies is not None else REPLIES
    dataset, _ = Dataset.objects.get_or_create(
        tenant=tenant, name=name, defaults={"kind": "training", "task": "text-generation"}
    )
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["context", "text"])
    writer.writerows([c, r] for c, r in rows)
    content = out.getvalue().encode()
    sha = hashlib.sha256(content).hexdigest()
    key = f"datasets/{tenant.slug}/{dataset.pk}/{sha}"
    _put(key, content)
    return DatasetVersion.objects.create(
        dataset=dataset, number=dataset.versions.count() + 1, sha256=sha,
        size_bytes=len(content), storage_key=key, format="csv", text_column="text",
        label_column="context", rows=len(rows), labels={}, duplicate_texts=0, preview=[],
    )  # fmt: skip


def register_autocomplete(
    tenant: Tenant,
    name: str,
    packed: PackedCompleter | None,
    data: DatasetVersion,
    *,
    trainer: Any = None,
) -> ModelVersion:
    """An autocomplete model version trained (as far as the registry knows) on ``data``;
    ``packed`` None registers one whose artifact is never read (the API-level tests)."""
    RegisteredModel.objects.get_or_create(
        tenant=tenant, name=name, defaults={"kind": "autocomplete"}
    )
    run = TrainingRun.objects.create(
        tenant=tenant, dataset_version=data, model_name=name, base_model="tiny-gpt2",
        params={}, status="succeeded", created_by=trainer,
    )  # fmt: skip
    key = f"models/{tenant.slug}/{run.pk}/model.tar"
    if packed is not None:
        get_store().put_file(key, packed.tar)
    sha256, size = (packed.sha256, packed.size) if packed is not None else ("cd" * 32, 1)
    return model_version_create(
        run=run, artifact_key=key, sha256=sha256, size_bytes=size, memory_bytes=size,
        predictions_key="", labels=[], metrics={}, format="full",
    )  # fmt: skip


def record_evaluation(version: ModelVersion, samples: list[dict[str, Any]]) -> Any:
    """A succeeded evaluation of ``version`` on its own corpus keeping ``samples`` (held-out
    prefixes with their greedy completions), as the evaluation task stores them."""
    from apps.evaluation.models import Evaluation

    return Evaluation.objects.create(
        tenant=version.registered_model.tenant, model_version=version,
        dataset_version=version.run.dataset_version, status="succeeded",
        artifact_sha256=version.sha256, metrics={"task": "text-generation"}, samples=samples,
    )  # fmt: skip
