"""Embedding deployments where no fleet is involved: the embed, search and reindex doors'
validation, tenancy and state errors; the index a deployment searches, built from the
version's own artifact; and the warm-up's checks (search ids, query and document
embeddings) against a backend answering in-process — a mismatch fails it. The replica path
on a real Ray is in test_embedding_fleet.py."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from django.db import transaction

from apps.core.artifacts import get_store
from apps.deployments import indexing, services
from apps.deployments.models import Deployment, FleetAlert
from apps.promotions.models import PromotionRequest
from apps.registry.models import ModelVersion
from tests.embedding_helpers import knowledge_base, register_embedding
from tests.test_deployments_api import deploy, make_version
from tests.worker.serving.embedding_models import PackedEmbedder, tiny_embedder
from worker.serving.embedding import EmbeddingModel, read_index
from worker.serving.loading import load_model

API = "/api/v1/tenants/acme"

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> PackedEmbedder:
    return tiny_embedder(tmp_path_factory.mktemp("embedder"), seed=5, separate=True)


@pytest.fixture
def embedding_version(tenant, artifacts_dir, packed) -> ModelVersion:
    return register_embedding(tenant, "faq-search", packed, knowledge_base(tenant))


class FakePlane:
    """A data plane answering embed and search from fixed values."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def embed(self, kind: str, model_id: str, texts: list[str], role: str) -> dict[str, Any]:
        self.calls.append(("embed", kind, model_id, tuple(texts), role))
        return {"embeddings": [[0.6, 0.8]] * len(texts), "dim": 2, "replica_id": "r"}

    def search(self, kind: str, model_id: str, query: str, k: int, index: str = "") -> Any:
        self.calls.append(("search", kind, model_id, query, k))
        hits = [
            {"document_id": f"faq{i:03d}", "title": f"t{i}", "score": 1 - i / 10} for i in range(k)
        ]
        return {"results": hits, "index": "x"}


def test_embed_and_search_of_another_tenants_model_are_404(embedding_version, outsider):
    deploy(embedding_version, "warm")
    for door, body in (("embed", {"inputs": ["hi"]}), ("search", {"query": "hi"})):
        assert outsider.api("post", f"{API}/models/faq-search/{door}", body).status_code == 404
        own = outsider.api("post", f"/api/v1/tenants/globex/models/faq-search/{door}", body)
        assert own.status_code == 404


def test_embed_and_search_without_a_warm_deployment_are_409_naming_the_status(
    embedding_version, viewer
):
    for door, body in (("embed", {"inputs": ["hi"]}), ("search", {"query": "hi"})):
        none_yet = viewer.api("post", f"{API}/models/faq-search/{door}", body)
        assert none_yet.status_code == 409
        assert none_yet.json()["error"]["code"] == "not_warm"
        assert none_yet.json()["error"]["status"] == "not_deployed"
    deploy(embedding_version, "pending")
    pending = viewer.api("post", f"{API}/models/faq-search/search", {"query": "hi"})
    assert pending.status_code == 409 and pending.json()["error"]["status"] == "pending"


def test_a_classifier_has_no_embed_and_an_embedding_model_no_predict(
    embedding_version, scientist, tenant, viewer
):
    deploy(make_version(scientist, tenant), "warm")
    deploy(embedding_version, "warm")
    embed = viewer.api("post", f"{API}/models/intents/embed", {"inputs": ["hi"]})
    assert embed.status_code == 409 and embed.json()["error"]["code"] == "not_embedding"
    search = viewer.api("post", f"{API}/models/intents/search", {"query": "hi"})
    assert search.status_code == 409 and search.json()["error"]["code"] == "not_embedding"
    predict = viewer.api("post", f"{API}/models/faq-search/predict", {"inputs": ["hi"]})
    assert predict.status_code == 409 and predict.json()["error"]["code"] == "not_a_classifier"


@pytest.mark.parametrize(
    ("door", "body", "field"),
    [
        ("embed", {}, "inputs"),
        ("embed", {"inputs": []}, "inputs"),
        ("embed", {"inputs": [""]}, "inputs"),
        ("embed", {"inputs": ["ok"] * 65}, "inputs"),
        ("embed", {"inputs": ["ok"], "role": "answer"}, "role"),
        ("search", {}, "query"),
        ("search", {"query": ""}, "query"),
        ("search", {"query": "ok", "k": 0}, "k"),
        ("search", {"query": "ok", "k": 101}, "k"),
        ("search", {"query": "ok", "environment": "prod"}, "environment"),
    ],
)
def test_embed_and_search_refuse_bad_input_naming_the_field(
    embedding_version, viewer, door, body, field
):
    deploy(embedding_version, "warm")
    response = viewer.api("post", f"{API}/models/faq-search/{door}", body)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]


def test_embed_and_search_answer_what_the_fleet_serves(embedding_version, viewer, monkeypatch):
    deployment = deploy(embedding_version, "warm", index_sha256="c" * 64)
    plane = FakePlane()
    monkeypatch.setattr("apps.deployments.fleet.data_plane", lambda: plane)
    embed = viewer.api(
        "post", f"{API}/models/faq-search/embed", {"inputs": ["a", "b"], "role": "document"}
    )
    assert embed.status_code == 200, embed.content
    body = embed.json()
    assert body["embeddings"] == [[0.6, 0.8], [0.6, 0.8]] and body["dim"] == 2
    assert body["role"] == "document" and body["model_version"] == embedding_version.pk
    assert body["version"] == 1 and body["latency_ms"] >= 0
    search = viewer.api("post", f"{API}/models/faq-search/search", {"query": "strike"})
    assert search.status_code == 200, search.content
    found = search.json()
    assert len(found["results"]) == 5 and found["k"] == 5  # the default k
    assert set(found["results"][0]) == {"document_id", "title", "score"}
    assert found["index_sha256"] == deployment.index_sha256
    assert plane.calls == [
        ("embed", "embedding", embedding_version.pk, ("a", "b"), "document"),
        ("search", "embedding", embedding_version.pk, "strike", 5),
    ]


def test_reindex_refusals_are_clear_and_change_nothing(
    embedding_version, scientist, reviewer, tenant, other_tenant, outsider
):
    classifier = deploy(make_version(scientist, tenant), "warm")
    newer = knowledge_base(tenant, "faq-v2", start=10)
    url = f"{API}/deployments/{{}}/reindex"
    body = {"dataset_version": newer.pk}
    assert scientist.api("post", url.format(classifier.pk), body).status_code == 403
    refused = reviewer.api("post", url.format(classifier.pk), body)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_embedding"
    loading = deploy(embedding_version, "loading")
    refused = reviewer.api("post", url.format(loading.pk), body)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_warm"
    Deployment.objects.filter(pk=loading.pk).update(status="warm")
    theirs = knowledge_base(other_tenant, "their-faq")
    refused = reviewer.api("post", url.format(loading.pk), {"dataset_version": theirs.pk})
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "unknown_dataset_version"
    classification = classifier.model_version.run.dataset_version
    refused = reviewer.api("post", url.format(loading.pk), {"dataset_version": classification.pk})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_retrieval"
    assert reviewer.api("post", url.format(loading.pk), {}).status_code == 400
    # Another tenant's deployment: not found at all.
    assert outsider.api("post", url.format(loading.pk), body).status_code == 404
    loading.refresh_from_db()
    assert loading.staged_dataset_version_id is None


def test_a_reindex_is_accepted_once_at_a_time(
    embedding_version, reviewer, tenant, django_capture_on_commit_callbacks
):
    warm = deploy(embedding_version, "warm")
    newer = knowledge_base(tenant, "faq-v2", start=10)
    url = f"{API}/deployments/{warm.pk}/reindex"
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        accepted = reviewer.api("post", url, {"dataset_version": newer.pk})
    assert accepted.status_code == 202, accepted.content
    assert accepted.json()["staged_dataset_version"] == newer.pk
    assert len(callbacks) == 1  # the index build, sent on commit
    again = reviewer.api("post", url, {"dataset_version": newer.pk})
    assert again.status_code == 409 and again.json()["error"]["code"] == "reindex_in_progress"


class InProcessBackend:
    """Answers embed and search as a replica would, from the version's own artifact and
    the deployment's index; ``tamper`` changes one kind of answer."""

    def __init__(self, version: ModelVersion, deployment: Deployment, tamper: str = "") -> None:
        store = get_store()
        loaded = load_model(store.uri(version.artifact_key), version.sha256, device="cpu")
        assert isinstance(loaded.classifier, EmbeddingModel)
        self.model = loaded.classifier
        with store.open(deployment.index_key) as fh:
            index = read_index(fh.read(), deployment.index_sha256)
        self.model.indexes[index.sha256] = index
        self.model.current = index.sha256
        self.tamper = tamper

    def embed(self, kind: str, model_id: str, texts: list[str], role: str) -> dict[str, Any]:
        vectors = self.model.embed(texts, role)
        if self.tamper == role:
            vectors = np.roll(vectors, 1, axis=1)
        return {"embeddings": vectors.tolist(), "dim": self.model.dim}

    def search(self, kind: str, model_id: str, query: str, k: int, index: str = "") -> Any:
        results = self.model.search(query, k, index)
        if self.tamper == "search":
            results = results[::-1]
        return {"results": results}


def test_the_index_is_built_from_the_versions_artifact_and_the_warmup_checks_it(
    embedding_version, tenant, settings
):
    settings.DEPLOYMENT_WARMUP_SAMPLES = 4
    deployment = deploy(embedding_version, "pending")
    built = indexing.build(deployment_id=deployment.pk, staged=False)
    assert built is not None and built.index_sha256 and not built.index_error
    data_version = embedding_version.run.dataset_version
    assert built.index_dataset_version_id == data_version.pk
    with get_store().open(built.index_key) as fh:
        data = fh.read()
    assert hashlib.sha256(data).hexdigest() == built.index_sha256
    index = read_index(data, built.index_sha256)
    assert len(index.ids) == built.index_documents == 10
    assert len(index.reference.queries) == 4  # the first distinct queries of its pairs

    backend = InProcessBackend(embedding_version, built)
    good = services.warmup_run(deployment=built, trigger="deploy", backend=backend)
    assert good.ok, good.error
    assert good.samples == 4 and not good.mismatches
    for tamper, check in (
        ("search", "search"),
        ("query", "embed_query"),
        ("document", "embed_document"),
    ):
        backend.tamper = tamper
        bad = services.warmup_run(deployment=built, trigger="deploy", backend=backend)
        assert not bad.ok
        assert {m["check"] for m in bad.mismatches} == {check}, bad.mismatches
        assert "differ from the evaluation's" in bad.error
    alert = FleetAlert.objects.get(deployment=built, kind="warmup_failed", resolved_at=None)
    assert "Warm-up of faq-search v1" in alert.message

    # The evaluation's recorded queries: their embeddings, and (same knowledge base) their
    # top 10, are checked too.
    from apps.evaluation.models import Evaluation

    backend.tamper = ""
    query = "How do I delete my facebook account?"
    vector = backend.model.embed([query], "query")[0]
    top = [r["document_id"] for r in backend.model.search(query, 10)]
    evaluation = Evaluation.objects.create(
        tenant=tenant, model_version=embedding_version, dataset_version=data_version,
        status="succeeded", artifact_sha256=embedding_version.sha256,
        metrics={"documents_sha256": data_version.documents_sha256},
        samples=[{"role": "query", "query": query, "embedding": vector.tolist(),
                  "document_ids": top, "scores": []}],
    )  # fmt: skip
    assert services.warmup_run(deployment=built, trigger="manual", backend=backend).ok
    evaluation.samples = [
        {
            "role": "query",
            "query": query,
            "embedding": (-vector).tolist(),
            "document_ids": top[::-1],
        }
    ]
    evaluation.save()
    bad = services.warmup_run(deployment=built, trigger="manual", backend=backend)
    assert {m["check"] for m in bad.mismatches} == {"evaluation", "evaluation_search"}


def test_a_knowledge_base_without_documents_fails_the_deployment_naming_why(
    embedding_version, tenant
):
    data = embedding_version.run.dataset_version
    type(data).objects.filter(pk=data.pk).update(documents_storage_key="")
    deployment = deploy(embedding_version, "pending")
    failed = indexing.build(deployment_id=deployment.pk, staged=False)
    assert failed is not None
    failed.refresh_from_db()
    assert failed.status == "failed" and "no documents to index" in failed.failure
    assert "no documents" in failed.index_error


def test_the_deployment_page_of_an_embedding_model_has_a_search_box(
    embedding_version, viewer, scientist, tenant, monkeypatch
):
    from django.test import Client

    warm = deploy(embedding_version, "warm", index_sha256="c" * 64, index_documents=10,
                  index_dataset_version=embedding_version.run.dataset_version)  # fmt: skip
    plane = FakePlane()
    monkeypatch.setattr("apps.deployments.fleet.data_plane", lambda: plane)
    client = Client()
    client.force_login(viewer.user)
    page = client.get(f"/t/acme/deployments/{warm.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="search-form"' in html and 'id="search-results"' not in html
    assert "10 documents from faq" in html
    found = client.get(f"/t/acme/deployments/{warm.pk}/?q=strikethrough&k=3")
    html = found.content.decode()
    assert 'id="search-results"' in html
    assert html.count("<code>faq00") == 3 and "t2" in html and "0.8000" in html
    assert plane.calls == [("search", "embedding", embedding_version.pk, "strikethrough", 3)]
    # A classifier's page has no search box.
    other = deploy(make_version(scientist, tenant), "warm")
    assert 'id="search"' not in client.get(f"/t/acme/deployments/{other.pk}/").content.decode()


def test_the_notebook_client_embeds_searches_and_reindexes(
    live_server, embedding_version, viewer, reviewer, tenant, monkeypatch
):
    from workbench.client import Workbench, WorkbenchError

    warm = deploy(embedding_version, "warm", index_sha256="c" * 64)
    plane = FakePlane()
    monkeypatch.setattr("apps.deployments.fleet.data_plane", lambda: plane)
    wb = Workbench(live_server.url, viewer.token, "acme")
    embedded = wb.embed("faq-search", "strikethrough", role="document")
    assert embedded["embeddings"] == [[0.6, 0.8]] and embedded["dim"] == 2
    found = wb.search("faq-search", "strikethrough", k=2)
    assert [r["document_id"] for r in found["results"]] == ["faq000", "faq001"]
    with pytest.raises(WorkbenchError) as missing:
        wb.search("no-such-model", "x")
    assert missing.value.status == 404
    with pytest.raises(WorkbenchError) as refused:
        wb.reindex(warm.pk, embedding_version.run.dataset_version_id)
    assert refused.value.status == 403  # a viewer may search, not reindex
    newer = knowledge_base(tenant, "faq-v2", start=10)
    accepted = Workbench(live_server.url, reviewer.token, "acme").reindex(warm.pk, newer.pk)
    assert accepted["staged_dataset_version"] == newer.pk


def test_an_index_build_that_never_came_is_sent_again_then_fails_the_deployment(
    embedding_version, settings, monkeypatch
):
    from datetime import timedelta

    from django.utils import timezone

    sent: list[tuple[str, bool]] = []
    monkeypatch.setattr(indexing, "_send", lambda pk, staged: sent.append((pk, staged)))
    settings.DEPLOYMENT_LOAD_ATTEMPTS = 2
    deployment = deploy(embedding_version, "pending")
    assert indexing.watch_builds() == [] and sent == []  # just sent: still building
    lost = timezone.now() - timedelta(seconds=indexing.BUILD_LOST_AFTER_SECONDS + 1)
    Deployment.objects.filter(pk=deployment.pk).update(created_at=lost)
    assert indexing.watch_builds() == [] and sent == [(deployment.pk, False)]
    Deployment.objects.filter(pk=deployment.pk).update(claimed_at=lost)
    assert indexing.watch_builds() == [deployment.pk]
    deployment.refresh_from_db()
    assert deployment.status == "failed" and "index was not built after 2 attempts" in (
        deployment.failure
    )


def test_a_reindex_whose_build_never_came_is_dropped_and_frees_the_next_one(
    embedding_version, reviewer, tenant, monkeypatch
):
    """A lost staged build must not block the deployment's reindexes forever: past the
    bound the reindex is dropped (the served index serving on, why recorded, alerted) and
    a new reindex is accepted."""
    from datetime import timedelta

    from django.utils import timezone

    monkeypatch.setattr(indexing, "_send", lambda pk, staged: None)  # the message is lost
    warm = deploy(embedding_version, "warm", index_sha256="a" * 64)
    newer = knowledge_base(tenant, "faq-v2", start=10)
    url = f"{API}/deployments/{warm.pk}/reindex"
    assert reviewer.api("post", url, {"dataset_version": newer.pk}).status_code == 202
    indexing.watch_builds()
    warm.refresh_from_db()
    assert warm.staged_dataset_version_id == newer.pk  # just asked for: still building
    lost = timezone.now() - timedelta(seconds=indexing.BUILD_LOST_AFTER_SECONDS + 1)
    Deployment.objects.filter(pk=warm.pk).update(staged_requested_at=lost)
    indexing.watch_builds()
    warm.refresh_from_db()
    assert warm.staged_dataset_version_id is None and warm.staged_requested_at is None
    assert warm.status == "warm" and warm.index_sha256 == "a" * 64
    assert "was not built within" in warm.index_error
    assert FleetAlert.objects.filter(deployment=warm).exists()
    assert reviewer.api("post", url, {"dataset_version": newer.pk}).status_code == 202


def test_the_controller_switches_to_a_staged_index_only_once_loaded_and_verified(
    embedding_version, tenant, settings
):
    from apps.deployments.controller import Controller, PassReport

    settings.DEPLOYMENT_WARMUP_SAMPLES = 2
    deployment = deploy(embedding_version, "pending")
    built = indexing.build(deployment_id=deployment.pk, staged=False)
    assert built is not None
    Deployment.objects.filter(pk=built.pk).update(status="warm")
    newer = knowledge_base(tenant, "faq-v2", start=10, count=6)
    Deployment.objects.filter(pk=built.pk).update(staged_dataset_version=newer)
    staged = indexing.build(deployment_id=built.pk, staged=True)
    assert staged is not None and staged.staged_index_sha256
    old, new = staged.index_sha256, staged.staged_index_sha256
    backend = InProcessBackend(embedding_version, staged)
    with get_store().open(staged.staged_index_key) as fh:
        backend.model.indexes[new] = read_index(fh.read(), new)
    controller = Controller(holder="test", backend=backend)  # type: ignore[arg-type]

    def pool(indexes: list[str], error: str | None = None) -> dict[str, Any]:
        model = {"model_id": embedding_version.pk, "loaded": True, "indexes": indexes,
                 "index_error": error}  # fmt: skip
        return {"sets": [{"name": "embedding-set-0", "replicas": [{"models": [model]}]}]}

    controller._step_reindex(staged, pool([old]), PassReport())  # not loaded yet: waits
    staged.refresh_from_db()
    assert staged.index_sha256 == old and staged.staged_index_sha256 == new
    report = PassReport()
    controller._step_reindex(staged, pool([old, new]), report)
    staged.refresh_from_db()
    assert report.went_live == [staged.pk] and report.warmups == 1
    assert staged.index_sha256 == new and staged.staged_index_sha256 == ""
    assert staged.index_dataset_version_id == newer.pk and staged.corpus_id == newer.pk
    assert staged.warmups.filter(trigger="reindex", ok=True).count() == 1

    # A staged index that fails to load on a replica: dropped, the index serves on.
    Deployment.objects.filter(pk=staged.pk).update(
        staged_dataset_version=embedding_version.run.dataset_version,
        staged_index_sha256="e" * 64,
    )
    staged.refresh_from_db()
    controller._step_reindex(staged, pool([new], error="index sha256 mismatch"), PassReport())
    staged.refresh_from_db()
    assert staged.index_sha256 == new and staged.staged_dataset_version_id is None
    assert "failed to load: index sha256 mismatch" in staged.index_error


def test_a_rollback_of_an_embedding_model_comes_back_with_the_index_it_served(
    embedding_version, packed, tenant, reviewer, django_capture_on_commit_callbacks
):
    from datetime import timedelta

    from django.utils import timezone

    old = deploy(embedding_version, "retired", warm_at=timezone.now() - timedelta(days=1),
                 standby=True, index_key="indexes/x/old.npz", index_sha256="a" * 64,
                 index_size_bytes=10, index_documents=3,
                 index_dataset_version=embedding_version.run.dataset_version)  # fmt: skip
    newer = register_embedding(tenant, "faq-search", packed, knowledge_base(tenant, "faq-2"))
    current = deploy(newer, "warm", warm_at=timezone.now(), replaces=old, index_sha256="b" * 64)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = reviewer.api("post", f"{API}/deployments/{current.pk}/rollback")
    assert response.status_code == 202, response.content
    rollback = Deployment.objects.get(pk=response.json()["id"])
    assert rollback.index_sha256 == old.index_sha256 and rollback.index_key == old.index_key
    assert rollback.index_dataset_version_id == old.index_dataset_version_id
    assert len(callbacks) == 1  # the fleet nudge only: no index build


def test_a_version_deployed_twice_searches_one_knowledge_base_and_is_not_reindexed_apart(
    embedding_version, reviewer, scientist, tenant
):
    """The fleet holds a version once, with one index: a second environment's deployment of
    it indexes what the first one searches (here the knowledge base staging was reindexed
    to), and neither may then be reindexed apart (409 index_shared, nothing changed)."""
    newer = knowledge_base(tenant, "faq-v2", start=10)
    staging = deploy(embedding_version, "warm", environment="staging")
    Deployment.objects.filter(pk=staging.pk).update(index_dataset_version=newer)
    assert indexing.shared_knowledge_base(embedding_version) == newer
    promotion = PromotionRequest.objects.create(
        tenant=tenant, model_version=embedding_version, target="production",
        artifact_sha256=embedding_version.sha256, status="approved",
        requested_by=scientist.user,
    )  # fmt: skip
    with transaction.atomic():
        created = services.deployment_create(actor=reviewer.user, promotion=promotion)
    assert created.corpus_id == newer.pk  # not the version's training data
    production = Deployment.objects.get(pk=created.pk)
    Deployment.objects.filter(pk=production.pk).update(status="warm")
    url = f"{API}/deployments/{production.pk}/reindex"
    refused = reviewer.api("post", url, {"dataset_version": newer.pk})
    assert refused.status_code == 409, refused.content
    assert refused.json()["error"]["code"] == "index_shared"
    assert staging.pk in refused.json()["error"]["message"]
    production.refresh_from_db()
    assert production.staged_dataset_version_id is None
