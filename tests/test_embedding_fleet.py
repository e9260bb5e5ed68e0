"""Embedding deployments on a real local Ray Serve fleet (the session's head): approve ->
index built from the version's artifact -> deployed on the embedding pool -> warm-up
verified -> embed and search through the REST API, equal to the version's own encoders
in-process and to a brute-force numpy search over the same embeddings; another tenant's
model is 404; a reindex switches to the new knowledge base while searches keep being
answered, and a reindex whose index does not verify is dropped with the old one serving.

The fleet controller's passes run in this process (tests/deploy_helpers.settle)."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import numpy as np
import pytest

from apps.deployments import fleet, indexing
from apps.deployments.backends import get_backend, reset_backend
from apps.deployments.controller import reconcile_until
from apps.deployments.dataplane import reset_data_plane
from apps.deployments.models import Deployment, FleetAlert, ServingPool
from tests.deploy_helpers import approve
from tests.embedding_helpers import knowledge_base, register_embedding
from tests.worker.serving.embedding_models import (
    PackedEmbedder,
    stackfaq_documents,
    stackfaq_queries,
    tiny_embedder,
)
from worker.embeddings import load_embedder
from worker.serving.embedding import build_index
from worker.serving.fleet import RayFleet

pytestmark = [pytest.mark.django_db(transaction=True)]

API = "/api/v1/tenants/acme"
QUERIES = ["How do I delete my facebook account?", "strikethrough text on github markdown"]


@pytest.fixture(scope="module")
def embedders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PackedEmbedder]:
    root = tmp_path_factory.mktemp("embedders")
    return {
        "tenant": tiny_embedder(root / "tenant", seed=3, separate=True),
        "impostor": tiny_embedder(root / "impostor", seed=11, separate=False),
    }


@pytest.fixture
def embedding_fleet(settings, ray_address, artifacts_dir, monkeypatch) -> Any:
    settings.RAY_ADDRESS = ray_address
    settings.RAY_NAMESPACE = f"emb-{uuid.uuid4().hex[:6]}"
    settings.SERVING_BACKEND = "ray"
    settings.DEPLOYMENT_WARMUP_SAMPLES = 4
    # The index build runs where the task would, at once (no worker in this test).
    monkeypatch.setattr(
        indexing, "_send", lambda deployment_id, staged: indexing.build(
            deployment_id=deployment_id, staged=staged
        )
    )  # fmt: skip
    reset_backend()
    reset_data_plane()
    yield settings
    for pool in ServingPool.objects.all():  # leave the shared Ray empty
        Deployment.objects.update(status="retired", standby=False)
        fleet.pool_apply(kind=pool.kind, backend=get_backend())
    reset_backend()
    reset_data_plane()


class BruteForce:
    """A numpy search over the version's own embeddings of a knowledge base, in-process."""

    def __init__(self, packed: PackedEmbedder, documents: list[Any]) -> None:
        self.embedder = load_embedder(packed.model_dir)
        self.ids = [d.id for d in documents]
        texts = [f"{d.title}\n{d.text}" for d in documents]  # the model's document_fields
        self.vectors = self.embedder.encode(texts, role="document").astype(np.float64)

    def __call__(self, query: str, k: int) -> list[str]:
        scores = self.vectors @ self.embedder.encode([query], role="query")[0]
        order = sorted(range(len(self.ids)), key=lambda i: (-scores[i], i))
        return [self.ids[i] for i in order[:k]]


def search(actor: Any, query: str, k: int = 5, slug: str = "acme") -> Any:
    return actor.api(
        "post", f"/api/v1/tenants/{slug}/models/faq-search/search", {"query": query, "k": k}
    )


def test_an_embedding_deployment_embeds_searches_and_reindexes_without_downtime(
    embedding_fleet, embedders, tenant, scientist, reviewer, viewer, outsider, monkeypatch
):
    first = knowledge_base(tenant, "faq", start=0, count=12)
    version = register_embedding(
        tenant, "faq-search", embedders["tenant"], first, trainer=scientist.user
    )
    deployment = approve(scientist, reviewer, version, "production")
    deployment.refresh_from_db()
    assert deployment.status == "warm", deployment.failure
    assert deployment.index_dataset_version_id == first.pk and deployment.index_documents == 12
    (warmup,) = deployment.warmups.all()
    assert warmup.ok and warmup.samples == 4

    # Embed: both roles as the version's own encoders answer in-process.
    alone = load_embedder(embedders["tenant"].model_dir)
    for role in ("query", "document"):
        response = viewer.api(
            "post", f"{API}/models/faq-search/embed", {"inputs": QUERIES, "role": role}
        )
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["dim"] == 384 and body["model_version"] == version.pk
        served = np.asarray(body["embeddings"], dtype=np.float32)
        np.testing.assert_allclose(served, alone.encode(QUERIES, role=role), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)

    # Search: equal to a brute-force numpy search over the same embeddings.
    documents = stackfaq_documents(12)
    brute_force = BruteForce(embedders["tenant"], documents)
    for query in [*QUERIES, *stackfaq_queries(documents, 3)]:
        response = search(viewer, query, k=5)
        assert response.status_code == 200, response.content
        ids = [r["document_id"] for r in response.json()["results"]]
        assert ids == brute_force(query, 5)
    # Concurrent searches and embeds (batched on the replica) each answer as alone.
    import concurrent.futures

    backend = get_backend()
    queries = [*QUERIES, *stackfaq_queries(documents, 6)]

    def ask(query: str) -> tuple[list[str], Any]:
        found = backend.search("embedding", version.pk, query, 5)  # type: ignore[attr-defined]
        embedded = backend.embed("embedding", version.pk, [query], "document")  # type: ignore[attr-defined]
        return [r["document_id"] for r in found["results"]], embedded["embeddings"][0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(queries)) as pool:
        answered = list(pool.map(ask, queries))
    for query, (ids, vector) in zip(queries, answered, strict=True):
        assert ids == brute_force(query, 5)
        np.testing.assert_allclose(vector, alone.encode([query], role="document")[0], atol=1e-5)
    titles = {d.id: d.title for d in documents}
    result = search(viewer, QUERIES[0], k=3).json()["results"][0]
    assert result["title"] == titles[result["document_id"]] and 0 < result["score"] <= 1

    # The deployment page's search box answers the same, and the fleet shows the index.
    from django.test import Client

    client = Client()
    client.force_login(viewer.user)
    page = client.get(f"/t/acme/deployments/{deployment.pk}/?q={QUERIES[0]}&k=5").content
    for document_id in brute_force(QUERIES[0], 5):
        assert f"<code>{document_id}</code>".encode() in page
    (pool,) = [p for p in viewer.api("get", "/api/v1/fleet/").json()["pools"]
               if p["kind"] == "embedding"]  # fmt: skip
    (model,) = [m for s in pool["sets"] for r in s["replicas"] for m in r["models"]]
    assert model["model_id"] == version.pk and model["index"] == deployment.index_sha256

    # Another tenant's model: not found, by either path.
    assert search(outsider, QUERIES[0]).status_code == 404
    assert search(outsider, QUERIES[0], slug="globex").status_code == 404

    # Reindex to a newer knowledge base while searches keep coming (through the fleet,
    # from a thread with a driver of its own).
    newer = knowledge_base(tenant, "faq-v2", start=6, count=14)
    newer_documents = stackfaq_documents(14, start=6)
    answers: list[list[str]] = []
    failures: list[str] = []
    stop = threading.Event()
    settings = embedding_fleet

    def keep_searching() -> None:
        driver = RayFleet(
            address=settings.RAY_ADDRESS,
            namespace=settings.RAY_NAMESPACE,
            local_dir=settings.SERVING_LOCAL_DIR,
        )
        try:
            while not stop.is_set():
                try:
                    reply = driver.search("embedding", version.pk, QUERIES[1], 5)
                    answers.append([r["document_id"] for r in reply["results"]])
                except Exception as error:
                    failures.append(f"{type(error).__name__}: {error}")
        finally:
            driver.close()

    searcher = threading.Thread(target=keep_searching, daemon=True)
    searcher.start()
    try:
        accepted = reviewer.api(
            "post", f"{API}/deployments/{deployment.pk}/reindex", {"dataset_version": newer.pk}
        )
        assert accepted.status_code == 202, accepted.content
        reconcile_until(
            lambda: Deployment.objects.get(pk=deployment.pk).index_dataset_version_id == newer.pk,
            timeout_s=180,
        )
        reconcile_until(lambda: True)  # the old index let go
    finally:
        stop.set()
        searcher.join(30)
    assert not failures, failures[:3]
    old_ids = brute_force(QUERIES[1], 5)
    new_ids = BruteForce(embedders["tenant"], newer_documents)(QUERIES[1], 5)
    assert old_ids != new_ids
    assert answers and all(a in (old_ids, new_ids) for a in answers)
    assert answers[0] == old_ids
    deployment.refresh_from_db()
    assert deployment.status == "warm" and deployment.staged_index_sha256 == ""
    assert deployment.index_documents == 14 and deployment.reindexed_at is not None
    response = search(viewer, QUERIES[1], k=5)
    assert [r["document_id"] for r in response.json()["results"]] == new_ids
    assert response.json()["dataset_version"] == newer.pk

    # A reindex whose index does not verify (built by another model than the one served):
    # the warm-up finds the mismatch, the staged index is dropped, the index serves on.
    served_index = deployment.index_sha256
    impostor = load_embedder(embedders["impostor"].model_dir)

    def impostor_bytes(deployment: Deployment, dataset_version: Any) -> bytes:
        return build_index(impostor, stackfaq_documents(12), queries=QUERIES)

    monkeypatch.setattr(indexing, "_index_bytes", impostor_bytes)
    accepted = reviewer.api(
        "post", f"{API}/deployments/{deployment.pk}/reindex", {"dataset_version": first.pk}
    )
    assert accepted.status_code == 202, accepted.content
    reconcile_until(
        lambda: Deployment.objects.get(pk=deployment.pk).staged_dataset_version_id is None,
        timeout_s=180,
    )
    deployment.refresh_from_db()
    assert deployment.index_sha256 == served_index and deployment.status == "warm"
    assert "warm-up failed" in deployment.index_error and "differ" in deployment.index_error
    alert = FleetAlert.objects.get(deployment=deployment, kind="warmup_failed", resolved_at=None)
    assert "new index" in alert.message and "previous index keeps serving" in alert.message
    response = search(viewer, QUERIES[1], k=5)
    assert [r["document_id"] for r in response.json()["results"]] == new_ids
