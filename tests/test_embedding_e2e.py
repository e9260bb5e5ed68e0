"""An embedding model's whole lifecycle through the REST API, on a real Celery worker, the
fleet controller (its own process) and a real Ray: a retrieval dataset and a golden set
uploaded with their knowledge base, a LoRA embedder trained on the worker, evaluated
against the un-tuned base, its promotion gated and approved, the knowledge base indexed
and the model deployed and warmed up — then the deployment's search answers exactly what
a brute-force search over the trained model's own embeddings does."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from apps.evaluation.models import Evaluation
from apps.registry.models import ModelVersion
from apps.training.models import TrainingRun
from tests.conftest import Actor
from tests.training_helpers import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]
API = "/api/v1/tenants/acme"
STACKFAQ = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "stackfaq"
DOCUMENTS = 12


def _rows(name: str) -> list[dict[str, str]]:
    with (STACKFAQ / name).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _csv(header: list[str], rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def upload(actor: Actor, name: str, kind: str, pairs: bytes, documents: bytes) -> str:
    created = actor.api(
        "post", f"{API}/datasets/", {"name": name, "kind": kind, "task": "retrieval"}
    )
    assert created.status_code == 201, created.content
    response = actor.client.post(
        f"{API}/datasets/{created.json()['id']}/versions/",
        {"file": SimpleUploadedFile("pairs.csv", pairs),
         "documents": SimpleUploadedFile("documents.csv", documents)},
    )  # fmt: skip
    assert response.status_code == 201, response.content
    return str(response.json()["id"])


def test_an_embedding_model_trains_passes_its_gates_deploys_and_searches_as_it_should(
    tmp_path: Path,
    celery_worker_process: Any,
    fleet_controller_process: Any,
    mlflow_server: str,
    ray_address: str,
    scientist: Actor,
    reviewer: Actor,
    admin: Actor,
    settings: Any,
) -> None:
    from apps.core.artifacts import get_store
    from apps.deployments.backends import reset_backend
    from apps.training.packaging import unpack
    from worker import retrieval
    from worker.embeddings import load_embedder
    from worker.retrieval_data import Document

    settings.ARTIFACT_STORE = f"file://{celery_worker_process.artifacts_root}"
    settings.MLFLOW_TRACKING_URI = mlflow_server
    settings.RAY_ADDRESS = ray_address
    reset_backend()
    documents = _rows("documents.csv")[:DOCUMENTS]
    ids = {d["id"] for d in documents}
    train = [p for p in _rows("train.csv") if p["document_id"] in ids]
    golden = [p for p in _rows("test.csv") if p["document_id"] in ids]
    docs_csv = _csv(["id", "title", "text"], documents)
    train_id = upload(scientist, "faq", "training", _csv(["query", "document_id"], train), docs_csv)
    upload(reviewer, "faq-golden", "golden", _csv(["query", "document_id"], golden), docs_csv)
    # A tiny run cannot be held to the defaults; the gates still decide (the un-tuned base
    # is the champion: a regression of more than 0.5 against it would block).
    policy = {"gates": [{"metric": "recall_at_5", "op": ">=", "value": 0.2}],
              "max_regression_vs_champion": 0.5}  # fmt: skip
    assert admin.api("put", f"{API}/policies/embedding/", policy).status_code == 200

    launch = {"dataset_version": train_id, "model_name": "faq-search",
              "params": {"epochs": 1, "max_length": 32, "batch_size": 16, "lora_r": 4}}  # fmt: skip
    launched = scientist.api("post", f"{API}/runs/", launch)
    assert launched.status_code == 202, launched.content
    assert launched.json()["base_model"] == "minilm-l6-embed"  # the default for retrieval data
    run_id = launched.json()["id"]
    wait_for(lambda: TrainingRun.objects.get(pk=run_id).status in ("succeeded", "failed"),
             timeout=300)  # fmt: skip
    run = TrainingRun.objects.get(pk=run_id)
    assert run.status == "succeeded", run.error
    version = ModelVersion.objects.get(run_id=run_id)
    assert version.registered_model.kind == "embedding" and version.format == "adapter"
    assert version.memory_bytes < 1_000_000 < version.base_memory_bytes
    assert {"val_recall_at_1", "val_mrr_at_10"} <= set(run.metrics)

    response = scientist.api("post", f"{API}/promotions/",
                             {"model_version": version.pk, "target": "staging"})  # fmt: skip
    assert response.status_code == 202, response.content
    promotion = f"{API}/promotions/{response.json()['id']}/"

    def status_after(waiting: str) -> str | None:
        status = str(scientist.api("get", promotion).json()["status"])
        return status if status != waiting else None

    assert wait_for(lambda: status_after("checking"), timeout=240) == "awaiting_approval", (
        scientist.api("get", promotion).json()
    )
    evaluation = Evaluation.objects.get(
        pk=scientist.api("get", promotion).json()["evaluation_ids"][0]
    )
    assert evaluation.metrics["task"] == "retrieval"
    assert evaluation.metrics["queries"] == len({p["query"] for p in golden})
    assert 0.0 <= evaluation.metrics["recall_at_1"] <= evaluation.metrics["recall_at_5"] <= 1.0
    assert evaluation.base_metrics["recall_at_5"] > 0  # the un-tuned base, measured beside it

    approved = reviewer.api("post", f"{promotion}approve", {"comment": "ok"})
    assert approved.status_code == 200, approved.content
    assert wait_for(lambda: status_after("deploying"), timeout=300) == "done", scientist.api(
        "get", f"{API}/deployments/"
    ).json()
    (deployment,) = scientist.api("get", f"{API}/deployments/").json()["results"]
    assert deployment["status"] == "warm" and deployment["environment"] == "staging"
    detail = scientist.api("get", f"{API}/deployments/{deployment['id']}/").json()
    assert detail["warmups"][0]["ok"]

    # The deployed search is a brute-force search over the trained model's own vectors.
    archive = tmp_path / "model.tar"
    with get_store().open(version.artifact_key) as fh:
        archive.write_bytes(fh.read())
    embedder = load_embedder(unpack(archive, tmp_path / "model"))
    doc_ids = [d["id"] for d in documents]
    doc_vectors = embedder.encode_documents(
        [Document(id=d["id"], text=d["text"], title=d["title"]) for d in documents]
    )
    queries = sorted({p["query"] for p in golden})[:5]
    expected = retrieval.search(embedder.encode(queries, role="query"), doc_vectors, doc_ids, 3)
    for query, want in zip(queries, expected, strict=True):
        answer = scientist.api("post", f"{API}/models/faq-search/search",
                               {"query": query, "k": 3, "environment": "staging"})  # fmt: skip
        assert answer.status_code == 200, answer.content
        results = answer.json()["results"]
        assert [r["document_id"] for r in results] == want.ids
        np.testing.assert_allclose([r["score"] for r in results], want.scores, atol=1e-4)
    body = {"inputs": queries[:2], "role": "query", "environment": "staging"}
    embedded = scientist.api("post", f"{API}/models/faq-search/embed", body)
    assert embedded.status_code == 200, embedded.content
    vectors = np.asarray(embedded.json()["embeddings"], dtype=np.float32)
    mine = embedder.encode(queries[:2], role="query")
    assert np.all(np.sum(vectors * mine, axis=1) >= 1 - 1e-4)
    reset_backend()
