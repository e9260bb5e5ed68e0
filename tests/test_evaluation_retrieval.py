"""An embedding model evaluated on a golden retrieval set, beside its un-tuned base; the
``embedding`` policy's gates; the review page's recall@k curve and wrong queries.

The evaluation task runs in this process (claim, heartbeat thread, finish, as a worker runs
it) on real :class:`worker.embeddings.Embedder` models on the shared MiniLM at max_length 32:
one whose LoRA factors are zero (the base itself, so it must measure exactly as the base)
and one with random factors (worse than the base). Data: a StackFAQ slice read in place
from ../shared, uploaded through the API.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from django.db import transaction
from django.test import Client

from apps.audit.models import AuditEvent
from apps.core.artifacts import get_store
from apps.datasets.models import DatasetVersion
from apps.evaluation import services
from apps.evaluation.models import EvalStatus, Evaluation
from apps.evaluation.tasks import run_evaluation
from apps.promotions import services as promotions
from apps.promotions.gates import check_gates
from apps.registry.models import ModelKind, ModelVersion, Stage
from apps.training import services as training
from apps.training.packaging import pack_dir
from tests.conftest import Actor
from tests.training_helpers import make_training_version
from worker import base_models
from worker.embeddings import write_embedder_dir

API = "/api/v1/tenants/acme"
STACKFAQ = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "stackfaq"
MODULES = ("encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense")
QUALITY = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr_at_10", "ndcg_at_10")


def stackfaq_files(documents: int = 20) -> tuple[bytes, bytes, list[dict[str, str]]]:
    """(pairs CSV, documents CSV, documents) of the first ``documents`` StackFAQ documents
    and the test queries that point into them."""
    with (STACKFAQ / "documents.csv").open(newline="", encoding="utf-8") as fh:
        docs = list(csv.DictReader(fh))[:documents]
    ids = {d["id"] for d in docs}
    with (STACKFAQ / "test.csv").open(newline="", encoding="utf-8") as fh:
        pairs = [p for p in csv.DictReader(fh) if p["document_id"] in ids]

    def table(header: list[str], rows: list[dict[str, str]]) -> bytes:
        out = io.StringIO()
        writer = csv.DictWriter(out, header, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r[k] for k in header} for r in rows)
        return out.getvalue().encode()

    return table(["query", "document_id"], pairs), table(["id", "title", "text"], docs), docs


def golden_retrieval_version(
    actor: Actor, name: str = "help-golden", kind: str = "golden"
) -> DatasetVersion:
    from django.core.files.uploadedfile import SimpleUploadedFile

    created = actor.api(
        "post", f"{API}/datasets/", {"name": name, "kind": kind, "task": "retrieval"}
    )
    assert created.status_code == 201, created.content
    pairs, documents, _ = stackfaq_files()
    response = actor.client.post(
        f"{API}/datasets/{created.json()['id']}/versions/",
        {
            "file": SimpleUploadedFile("pairs.csv", pairs),
            "documents": SimpleUploadedFile("documents.csv", documents),
        },
    )
    assert response.status_code == 201, response.content
    return DatasetVersion.objects.select_related("dataset").get(pk=response.json()["id"])


def shared_retrieval_version(staff: Actor) -> DatasetVersion:
    """The banking domain's shared golden retrieval set, uploaded by staff."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    created = staff.api("post", "/api/v1/shared-datasets/",
                        {"name": "banking-kb-golden", "domain": "banking",
                         "task": "retrieval"})  # fmt: skip
    assert created.status_code == 201, created.content
    pairs, documents, _ = stackfaq_files()
    response = staff.client.post(
        f"/api/v1/shared-datasets/{created.json()['id']}/versions/",
        {
            "file": SimpleUploadedFile("pairs.csv", pairs),
            "documents": SimpleUploadedFile("documents.csv", documents),
        },
    )
    assert response.status_code == 201, response.content
    return DatasetVersion.objects.get(pk=response.json()["id"])


def embedding_version(
    actor: Actor, tenant: Any, tmp_path: Path, *, noise: float, name: str = "help-embed"
) -> ModelVersion:
    """A real embedding model artifact in the store, registered as a run registers it:
    LoRA factors ``noise`` times random (0: exactly the un-tuned base)."""
    base = base_models.MINILM_L6_EMBED
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for module in MODULES:
        inner = 384 if "attention" in module else 1536
        tensors[f"{module}.lora_A"] = torch.randn(2, inner, generator=generator)
        tensors[f"{module}.lora_B"] = torch.randn(384, 2, generator=generator) * noise
    meta = {
        "kind": "embedding", "format": "adapter", "base_model": base,
        "base": base_models.get(base).base, "base_sha256": base_models.base_sha256(base),
        "lora": {"r": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": list(MODULES)},
        "max_length": 32, "pooling": "mean", "separate": False, "dim": 384,
        "document_fields": "title_text",
    }  # fmt: skip
    folder = tmp_path / f"model-{noise}"
    write_embedder_dir(folder / "model", meta=meta, query=tensors, document=None)
    sha256, size = pack_dir(folder / "model", folder / "model.tar")
    key = f"models/{tenant.pk}/{name}-{noise}/model.tar"
    get_store().put_file(key, folder / "model.tar")
    data = DatasetVersion.objects.filter(dataset__tenant=tenant, dataset__name="kb-train").first()
    data = data or golden_retrieval_version(actor, name="kb-train", kind="training")
    # Launched, claimed and finished in one transaction: no worker trains the run.
    with transaction.atomic():
        run = training.run_launch(actor=actor.user, tenant=tenant, dataset_version=data,
                                  base_model=base, params={}, model_name=name)  # fmt: skip
        assert training.run_claim(run_id=run.pk, worker="this-test:1") is not None
        training.run_succeed(
            run_id=run.pk, attempt=1, metrics={}, stop_reason="completed", stop_detail="",
            progress={}, version_fields={
                "artifact_key": key, "sha256": sha256, "size_bytes": size,
                "memory_bytes": size, "predictions_key": "", "labels": [], "metrics": {},
                "format": "adapter", "base_sha256": str(meta["base_sha256"]),
            },
        )  # fmt: skip
    version = ModelVersion.objects.select_related("registered_model").get(run_id=run.pk)
    assert version.registered_model.kind == ModelKind.EMBEDDING
    return version


@pytest.fixture
def no_dispatch(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The evaluation tasks the services would send; this test runs them itself."""
    sent: list[str] = []
    monkeypatch.setattr(services, "_send", sent.append)
    monkeypatch.setattr(services, "_enqueue_promotion_checks", lambda: None)
    return sent


@pytest.mark.django_db(transaction=True)
def test_an_embedding_version_is_evaluated_beside_its_base_on_the_golden_retrieval_sets(
    scientist, reviewer, staff, tenant, artifacts_dir, tmp_path, settings, no_dispatch
):
    settings.TRAINING_WORK_DIR = tmp_path / "work"
    golden = golden_retrieval_version(reviewer)
    make_training_version(reviewer, name="intents-golden", kind="golden")  # a classifier's
    same_as_base = embedding_version(scientist, tenant, tmp_path, noise=0.0)

    response = scientist.api("post", f"{API}/evaluations/", {"model_version": same_as_base.pk})
    assert response.status_code == 202, response.content
    (queued,) = response.json()["evaluations"]  # the retrieval set only
    assert queued["dataset_version"] == golden.pk and no_dispatch == [queued["id"]]
    assert run_evaluation(queued["id"]) == "succeeded", Evaluation.objects.get(
        pk=queued["id"]
    ).error

    first = Evaluation.objects.get(pk=queued["id"])
    assert first.status == EvalStatus.SUCCEEDED and first.attempt == 1 and first.claimed_by
    metrics, base = first.metrics, first.base_metrics
    assert metrics["task"] == "retrieval" and metrics["max_length"] == 32
    assert metrics["documents"] == 20 and metrics["queries"] == metrics["pairs"] == 60
    curve = metrics["recall_curve"]
    assert len(curve) == 20 and curve == sorted(curve) and curve[0] == metrics["recall_at_1"]
    assert curve[4] == metrics["recall_at_5"] and curve[9] == metrics["recall_at_10"]
    # Zero LoRA factors: the version is its base, and measures exactly as the base does.
    assert base["base_model"] == "minilm-l6-embed" and base["max_length"] == 32
    assert base["reused_from"] is None and base["document_fields"] == "title_text"
    assert {k: metrics[k] for k in QUALITY} == pytest.approx({k: base[k] for k in QUALITY})
    assert base["recall_curve"] == pytest.approx(curve)
    assert 0.5 < metrics["recall_at_5"] <= 1.0
    # Wrong queries: the first result is not relevant; titles come from the knowledge base.
    assert len(first.wrong_queries) == metrics["wrong_queries"] > 0
    titles = {d["id"]: d["title"] for d in stackfaq_files()[2]}
    for wrong in first.wrong_queries:
        assert wrong["ranked"][0]["document_id"] not in wrong["relevant"]
        assert wrong["title"] == titles[wrong["document_id"]]
        assert wrong["ranked"][0]["title"] == titles[wrong["ranked"][0]["document_id"]]
    # Warm-up material of the tenant's own set: queries and documents with their vectors.
    roles = [s["role"] for s in first.samples]
    assert roles.count("query") == 8 and roles.count("document") == 4
    assert len(first.samples[0]["embedding"]) == 384
    event = AuditEvent.objects.get(verb="evaluation.succeeded", object_id=first.pk)
    assert event.after is not None and event.after["recall_at_1"] == metrics["recall_at_1"]

    # Another version of the same base and max length: the base's numbers are reused. The
    # banking domain's shared golden retrieval set joins its evaluations, measured all the
    # same, but none of its queries kept (they are for staff eyes only).
    shared = shared_retrieval_version(staff)
    noisy = embedding_version(scientist, tenant, tmp_path, noise=2.0, name="help-embed-2")
    second, on_shared = sorted(
        services.evaluation_request(actor=scientist.user, tenant=tenant, model_version=noisy),
        key=lambda e: e.dataset_version_id != golden.pk,
    )
    assert on_shared.dataset_version_id == shared.pk
    for evaluation in (second, on_shared):
        outcome = run_evaluation(evaluation.pk)
        assert outcome == "succeeded", Evaluation.objects.get(pk=evaluation.pk).error
    on_shared.refresh_from_db()
    assert on_shared.metrics["wrong_queries"] > 0 and on_shared.base_metrics["recall_at_1"] > 0
    assert on_shared.wrong_queries == [] and on_shared.samples == []
    assert on_shared.base_metrics["reused_from"] is None  # another set, measured afresh
    second.refresh_from_db()
    assert second.base_metrics["reused_from"] == first.pk
    assert second.base_metrics["recall_at_1"] == base["recall_at_1"]
    assert second.metrics["recall_at_1"] < base["recall_at_1"]  # random factors hurt

    # REST: the retrieval block carries the metrics, the base's and both curves.
    body = scientist.api("get", f"{API}/evaluations/{second.pk}/").json()
    retrieval = body["retrieval"]
    assert retrieval["metrics"]["recall_at_1"] == second.metrics["recall_at_1"]
    assert retrieval["base"]["recall_at_1"] == base["recall_at_1"]
    assert retrieval["curve"] == second.metrics["recall_curve"]
    assert retrieval["base_curve"] == base["recall_curve"]
    assert retrieval["wrong_queries"] == second.metrics["wrong_queries"]
    assert retrieval["base"]["base_model"] == "minilm-l6-embed"
    listed = scientist.api("get", f"{API}/evaluations/").json()["results"]
    assert {e["id"] for e in listed if e["retrieval"] is not None} == {
        first.pk, second.pk, on_shared.pk}  # fmt: skip


@pytest.mark.django_db
def test_an_embedding_model_is_not_evaluated_on_classification_data(
    scientist, reviewer, tenant, artifacts_dir, tmp_path, no_dispatch
):
    version = embedding_version(scientist, tenant, tmp_path, noise=0.0)
    intents = make_training_version(reviewer, name="intents-golden", kind="golden")
    none_yet = scientist.api("post", f"{API}/evaluations/", {"model_version": version.pk})
    assert none_yet.status_code == 400
    assert "golden retrieval" in none_yet.json()["error"]["message"]
    response = scientist.api(
        "post", f"{API}/evaluations/", {"model_version": version.pk, "dataset_versions": [intents]}
    )
    assert response.status_code == 400
    assert "retrieval" in response.json()["error"]["fields"]["dataset_versions"][0]
    assert not Evaluation.objects.exists() and no_dispatch == []


def test_a_classifier_evaluation_has_no_retrieval_block():
    from apps.evaluation.api import _retrieval

    assert _retrieval(Evaluation(metrics={"macro_f1": 0.9, "accuracy": 0.9})) is None
    block = _retrieval(Evaluation(metrics={"task": "retrieval", "recall_at_1": 0.5}))
    assert block is not None and block["base"] is None and block["curve"] == []


# --- gates ---------------------------------------------------------------------------------

OURS = {"ds_a": {"dataset_name": "a", "recall_at_1": 0.80, "recall_at_5": 0.95,
                 "mrr_at_10": 0.86, "ndcg_at_10": 0.88}}  # fmt: skip


def test_embedding_gates_pass_fail_and_regression_against_the_base():
    gates = services.default_gates(ModelKind.EMBEDDING)
    regression = services.regression_metrics(ModelKind.EMBEDDING)
    base = {"ds_a": {"recall_at_1": 0.72, "recall_at_5": 0.885, "mrr_at_10": 0.794,
                     "ndcg_at_10": 0.83}}  # fmt: skip
    rows = check_gates(gates=gates, results=OURS, max_regression=0.0, champion=base,
                       regression_metrics=regression,
                       champion_names={"ds_a": "un-tuned base"})  # fmt: skip
    assert {r["metric"] for r in rows if r["gate"] == "policy"} == {
        "recall_at_1", "recall_at_5", "mrr_at_10", "ndcg_at_10"}  # fmt: skip
    assert all(r["passed"] for r in rows)
    against = [r for r in rows if r["gate"] == "regression vs un-tuned base"]
    assert [r["metric"] for r in against] == list(regression)
    assert against[0]["champion_value"] == 0.72 and against[0]["threshold"] == 0.72

    worse = {"ds_a": {**OURS["ds_a"], "recall_at_1": 0.70, "recall_at_5": 0.45}}
    rows = check_gates(gates=gates, results=worse, max_regression=0.0, champion=base,
                       regression_metrics=regression)  # fmt: skip
    failing = {(r["gate"], r["metric"]) for r in rows if not r["passed"]}
    assert failing == {
        ("policy", "recall_at_5"),  # below the 0.5 floor
        ("regression vs champion", "recall_at_1"),  # 0.70 < the base's 0.72
        ("regression vs champion", "recall_at_5"),
    }


@pytest.mark.django_db
def test_the_embedding_policy_has_defaults_and_is_edited_through_the_api(viewer, admin):
    body = viewer.api("get", f"{API}/policies/embedding/").json()
    assert {g["metric"] for g in body["gates"]} == {
        "recall_at_1", "recall_at_5", "mrr_at_10", "ndcg_at_10"}  # fmt: skip
    assert body["max_regression_vs_champion"] == 0.0
    wrong = admin.api("put", f"{API}/policies/embedding/",
                      {"gates": [{"metric": "macro_f1", "op": ">=", "value": 0.8}]})  # fmt: skip
    assert wrong.status_code == 400
    assert "not measured on macro_f1" in str(wrong.json()["error"]["fields"]["gates"])
    change = {"gates": [{"metric": "recall_at_5", "op": ">=", "value": 0.8}],
              "max_regression_vs_champion": 0.01}  # fmt: skip
    response = admin.api("put", f"{API}/policies/embedding/", change)
    assert response.status_code == 200, response.content
    assert response.json()["gates"][0]["metric"] == "recall_at_5"
    # The classifier's policy is another row, still its defaults.
    classifier = viewer.api("get", f"{API}/policies/classifier/").json()
    assert {g["metric"] for g in classifier["gates"]} == {"macro_f1", "latency_ms_p95"}


def finish(evaluation_ids: list[str], *, ours: dict[str, float], base: dict[str, float]) -> None:
    curve = [min(1.0, ours["recall_at_1"] + 0.02 * k) for k in range(20)]
    Evaluation.objects.filter(pk__in=evaluation_ids).update(
        status=EvalStatus.SUCCEEDED,
        metrics={"task": "retrieval", **ours, "recall_curve": curve, "queries": 60,
                 "wrong_queries": 1, "latency_ms_p95": 3.0},
        base_metrics={"task": "retrieval", **base, "base_model": "minilm-l6-embed",
                      "recall_curve": [min(1.0, base["recall_at_1"] + 0.02 * k)
                                       for k in range(20)], "max_length": 32},
        wrong_queries=[{"query": "How to strike <s>text</s> on github?",
                        "document_id": "faq000", "title": "Strikethrough with GitHub Markdown",
                        "relevant": ["faq000"], "first_hit": 3,
                        "ranked": [{"document_id": "faq009", "title": "Bold text in Slack",
                                    "score": 0.61}]}],
    )  # fmt: skip


GOOD = {"recall_at_1": 0.82, "recall_at_5": 0.95, "mrr_at_10": 0.87, "ndcg_at_10": 0.9}
BASE = {"recall_at_1": 0.72, "recall_at_5": 0.885, "mrr_at_10": 0.794, "ndcg_at_10": 0.83}


@pytest.mark.django_db
def test_a_promotion_is_held_to_the_base_without_a_champion_and_to_the_champion_with_one(
    scientist, reviewer, tenant, artifacts_dir, tmp_path, no_dispatch
):
    golden_retrieval_version(reviewer)
    first = embedding_version(scientist, tenant, tmp_path, noise=0.0)
    request = promotions.promotion_request(actor=scientist.user, tenant=tenant,
                                           model_version=first, target="staging")  # fmt: skip
    assert len(request.evaluation_ids) == 1
    finish(request.evaluation_ids, ours={**GOOD, "recall_at_1": 0.70}, base=BASE)
    checked = promotions.promotion_check(promotion_id=request.pk)
    assert checked is not None and checked.status == "gates_failed"
    failing = [r for r in checked.gate_results if not r["passed"]]
    assert [(r["gate"], r["metric"]) for r in failing] == [
        ("regression vs un-tuned base", "recall_at_1")
    ]

    # With a version in production, the regression check is against it, not the base.
    ModelVersion.objects.filter(pk=first.pk).update(stage=Stage.PRODUCTION)
    Evaluation.objects.filter(pk__in=request.evaluation_ids).update(
        metrics={"task": "retrieval", **GOOD, "recall_curve": [0.82] + [0.95] * 19}
    )
    second = embedding_version(scientist, tenant, tmp_path, noise=0.5)
    again = promotions.promotion_request(actor=scientist.user, tenant=tenant,
                                         model_version=second, target="staging")  # fmt: skip
    finish(again.evaluation_ids, ours={**GOOD, "recall_at_1": 0.75}, base=BASE)
    checked = promotions.promotion_check(promotion_id=again.pk)
    assert checked is not None and checked.champion_id == first.pk
    against = [r for r in checked.gate_results if r["gate"].startswith("regression")]
    assert {r["gate"] for r in against} == {"regression vs champion"}
    assert [(r["metric"], r["passed"]) for r in against if not r["passed"]] == [
        ("recall_at_1", False)  # 0.75 above the base's 0.72, below the champion's 0.82
    ]
    assert checked.status == "gates_failed"
    # The review page draws the champion's curve beside the version's and the base's.
    client = Client()
    client.force_login(reviewer.user)
    page = client.get(f"/t/acme/reviews/{again.pk}/").content.decode()
    for name in ("version", "base", "champion"):
        assert f'<polyline class="series" data-name="{name}"' in page


# --- the review page -----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_review_page_draws_the_recall_curve_and_lists_the_wrong_queries(
    scientist, reviewer, tenant, artifacts_dir, tmp_path, no_dispatch
):
    golden_retrieval_version(reviewer)
    version = embedding_version(scientist, tenant, tmp_path, noise=0.0)
    request = promotions.promotion_request(actor=scientist.user, tenant=tenant,
                                           model_version=version, target="staging")  # fmt: skip
    finish(request.evaluation_ids, ours=GOOD, base=BASE)
    checked = promotions.promotion_check(promotion_id=request.pk)
    assert checked is not None and checked.status == "awaiting_approval"
    client = Client()
    client.force_login(reviewer.user)
    page = client.get(f"/t/acme/reviews/{request.pk}/").content.decode()
    (evaluation_id,) = request.evaluation_ids
    assert f'id="recall-curve-{evaluation_id}"' in page
    assert 'data-name="version"' in page and 'data-name="base"' in page
    assert f'id="retrieval-metrics-{evaluation_id}"' in page
    assert 'data-metric="recall_at_1"' in page and "0.82" in page and "0.72" in page
    assert f'id="wrong-queries-{evaluation_id}"' in page
    # Customer text is escaped, never markup.
    assert "How to strike &lt;s&gt;text&lt;/s&gt; on github?" in page
    assert "Strikethrough with GitHub Markdown" in page and "faq009" in page
    assert "Bold text in Slack" in page
    assert "regression vs un-tuned base" in page
    # The same list through the API, paginated; not another tenant's to read.
    url = f"{API}/evaluations/{evaluation_id}/wrong-queries"
    listed = scientist.api("get", url)
    assert listed.status_code == 200, listed.content
    (wrong,) = listed.json()["results"]
    assert wrong["query"] == "How to strike <s>text</s> on github?" and wrong["first_hit"] == 3
    assert wrong["ranked"][0] == {"document_id": "faq009", "title": "Bold text in Slack",
                                  "score": 0.61}  # fmt: skip
    assert scientist.api("get", f"{API}/evaluations/ev_nope/wrong-queries").status_code == 404


@pytest.mark.django_db
def test_an_admin_edits_the_embedding_policy_on_the_policies_page(admin, tenant):
    from apps.evaluation.models import PromotionPolicy

    client = Client()
    client.force_login(admin.user)
    page = client.get("/t/acme/policies/").content.decode()
    assert 'id="edit-policy-embedding"' in page
    form = client.get("/t/acme/policies/?kind=embedding").content.decode()
    assert "Edit the embedding policy" in form and 'action="?kind=embedding"' in form
    assert '<option value="recall_at_5"' in form and '<option value="macro_f1"' not in form
    data = {
        "gates-TOTAL_FORMS": "2", "gates-INITIAL_FORMS": "0", "gates-MIN_NUM_FORMS": "0",
        "gates-MAX_NUM_FORMS": "5", "gates-0-metric": "recall_at_5", "gates-0-op": ">=",
        "gates-0-value": "0.9", "gates-0-dataset": "", "gates-1-metric": "", "gates-1-op": "",
        "gates-1-value": "", "gates-1-dataset": "", "max_regression_vs_champion": "0",
    }  # fmt: skip
    too_high = client.post("/t/acme/policies/?kind=embedding", {**data, "gates-0-value": "2"})
    assert too_high.status_code == 400 and "between 0 and 1" in too_high.content.decode()
    response = client.post("/t/acme/policies/?kind=embedding", data)
    assert response.status_code == 302 and response["Location"].endswith("?kind=embedding")
    policy = PromotionPolicy.objects.get(tenant=tenant, model_kind="embedding")
    assert policy.gates == [{"metric": "recall_at_5", "op": ">=", "value": 0.9, "dataset": None}]
    assert policy.max_regression_vs_champion == 0.0
    assert not PromotionPolicy.objects.filter(tenant=tenant, model_kind="classifier").exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.celery_worker
def test_a_promotion_of_an_embedding_version_is_evaluated_on_a_real_worker_and_gated(
    celery_worker_process, scientist, reviewer, tenant, settings, tmp_path
):
    from tests.training_helpers import wait_for

    settings.ARTIFACT_STORE = f"file://{celery_worker_process.artifacts_root}"
    golden = golden_retrieval_version(reviewer)
    version = embedding_version(scientist, tenant, tmp_path, noise=0.0)
    response = scientist.api(
        "post", f"{API}/promotions/", {"model_version": version.pk, "target": "staging"}
    )
    assert response.status_code == 202, response.content
    promotion_id = response.json()["id"]

    def decided() -> str | None:
        status = scientist.api("get", f"{API}/promotions/{promotion_id}/").json()["status"]
        return status if status != "checking" else None

    # The worker claims the evaluation, heartbeats, measures the version and its base,
    # finishes it and checks the waiting promotion against the default embedding policy.
    status = wait_for(decided, timeout=240)
    body = scientist.api("get", f"{API}/promotions/{promotion_id}/").json()
    assert status == "awaiting_approval", body
    (evaluation_id,) = body["evaluation_ids"]
    evaluation = Evaluation.objects.get(pk=evaluation_id)
    assert evaluation.dataset_version_id == golden.pk and evaluation.attempt == 1
    assert evaluation.claimed_by and evaluation.heartbeat_at is not None
    assert evaluation.base_metrics["recall_at_1"] == evaluation.metrics["recall_at_1"]
    gates = {(r["gate"], r["metric"]) for r in body["gate_results"]}
    assert ("regression vs un-tuned base", "recall_at_1") in gates
    assert ("policy", "recall_at_5") in gates and all(r["passed"] for r in body["gate_results"])
    client = Client()
    client.force_login(reviewer.user)
    page = client.get(f"/t/acme/reviews/{promotion_id}/").content.decode()
    assert f'id="recall-curve-{evaluation_id}"' in page
    assert f'id="wrong-queries-{evaluation_id}"' in page or "finds a relevant document" in page
