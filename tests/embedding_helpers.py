"""Embedding deployments through the workbench's services, shared by the API and the fleet
tests: retrieval dataset versions of a stackfaq slice (the files written to a temporary
directory and stored, never copied into the repository) and registered embedding model
versions of tiny packed embedders."""

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
from tests.worker.serving.embedding_models import (
    STACKFAQ,
    Doc,
    PackedEmbedder,
    stackfaq_documents,
    stackfaq_queries,
)
from worker import base_models


def _put(key: str, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "file"
        path.write_bytes(content)
        get_store().put_file(key, path)


def _csv(header: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def retrieval_version(
    tenant: Tenant, name: str, documents: list[Doc], pairs: list[tuple[str, str]]
) -> DatasetVersion:
    """A retrieval dataset version (pairs and knowledge base stored) of ``tenant``."""
    dataset, _ = Dataset.objects.get_or_create(
        tenant=tenant, name=name, defaults={"kind": "training", "task": "retrieval"}
    )
    pairs_bytes = _csv(["query", "document_id"], [list(p) for p in pairs])
    docs_bytes = _csv(["id", "title", "text"], [[d.id, d.title, d.text] for d in documents])
    sha, docs_sha = hashlib.sha256(pairs_bytes).hexdigest(), hashlib.sha256(docs_bytes).hexdigest()
    number = dataset.versions.count() + 1
    key, docs_key = (
        f"datasets/{tenant.slug}/{dataset.pk}/{sha}",
        f"datasets/{tenant.slug}/d/{docs_sha}",
    )
    _put(key, pairs_bytes)
    _put(docs_key, docs_bytes)
    return DatasetVersion.objects.create(
        dataset=dataset, number=number, sha256=sha, size_bytes=len(pairs_bytes),
        storage_key=key, format="csv", text_column="query", label_column="document_id",
        rows=len(pairs), labels={}, duplicate_texts=0, preview=[],
        documents_storage_key=docs_key, documents_format="csv", documents_sha256=docs_sha,
        documents_size_bytes=len(docs_bytes), documents_count=len(documents),
    )  # fmt: skip


def register_embedding(
    tenant: Tenant,
    name: str,
    packed: PackedEmbedder,
    data: DatasetVersion,
    *,
    trainer: Any = None,
    **extra: Any,
) -> ModelVersion:
    """An embedding model version trained (as far as the registry knows) on ``data`` by
    ``trainer`` (a user)."""
    RegisteredModel.objects.get_or_create(tenant=tenant, name=name, defaults={"kind": "embedding"})
    run = TrainingRun.objects.create(
        tenant=tenant, dataset_version=data, model_name=name,
        base_model=base_models.MINILM_L6_EMBED, params={}, status="succeeded",
        created_by=trainer,
    )  # fmt: skip
    key = f"models/{tenant.slug}/{run.pk}/model.tar"
    get_store().put_file(key, packed.tar)
    return model_version_create(
        run=run, artifact_key=key, sha256=packed.sha256, size_bytes=packed.size,
        memory_bytes=packed.size, predictions_key="", labels=[], metrics={},
        format="adapter", base_sha256=base_models.base_sha256(base_models.MINILM_L6_EMBED) or "",
        base_memory_bytes=0, **extra,
    )  # fmt: skip


def knowledge_base(
    tenant: Tenant, name: str = "faq", *, start: int = 0, count: int = 10
) -> DatasetVersion:
    documents = stackfaq_documents(count, start=start)
    by_id = {d.id: d for d in documents}
    queries = stackfaq_queries(documents, 3 * count)
    pairs = [(query, _document_of(query, by_id)) for query in queries]
    return retrieval_version(tenant, name, documents, pairs)


def _document_of(query: str, documents: dict[str, Any]) -> str:
    with (STACKFAQ / "test.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["query"] == query and row["document_id"] in documents:
                return str(row["document_id"])
    raise AssertionError(query)
