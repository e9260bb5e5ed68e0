"""The review dashboard: queue with counts, a request's page with gates and heat maps,
approve / reject with four eyes, requesting a promotion, and the policies page.

Requests are made through ``services.promotion_request`` and their evaluations marked
finished as a worker would (as in ``tests/test_promotions.py``); no Celery worker runs.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

from apps.audit.models import AuditEvent
from apps.datasets.models import DatasetVersion
from apps.evaluation.models import EvalStatus, Evaluation, PromotionPolicy
from apps.promotions import services
from apps.promotions.charts import confusion_heatmap
from apps.promotions.models import PromotionRequest
from apps.registry.models import ModelVersion
from apps.registry.services import model_version_create
from apps.tenants.models import Tenant
from apps.training import services as training
from tests.conftest import Actor
from tests.training_helpers import make_training_version

BASE = "/t/acme"
LABELS = ["card_lost", "balance", "refund"]
CONFUSION = [[8, 1, 1], [0, 9, 1], [2, 0, 8]]


def login(actor: Actor) -> Client:
    client = Client()
    client.force_login(actor.user)
    return client


def make_version(actor: Actor, tenant: Tenant, sha: str = "cd") -> ModelVersion:
    found = DatasetVersion.objects.filter(dataset__tenant=tenant, dataset__name="intents").first()
    version = found or DatasetVersion.objects.get(pk=make_training_version(actor))
    run = training.run_launch(actor=actor.user, tenant=tenant, dataset_version=version,
                              base_model="tiny-bert", params={},
                              model_name="intents-clf")  # fmt: skip
    return model_version_create(
        run=run, artifact_key="models/x/model.tar", sha256=sha * 32, size_bytes=1,
        memory_bytes=1, predictions_key="models/x/p.jsonl", labels=LABELS, metrics={},
    )  # fmt: skip


def finish(promotion: PromotionRequest, *, macro_f1: float) -> PromotionRequest:
    Evaluation.objects.filter(pk__in=promotion.evaluation_ids).update(
        status=EvalStatus.SUCCEEDED,
        metrics={
            "accuracy": macro_f1,
            "macro_f1": macro_f1,
            "ece": 0.05,
            "latency_ms_p50": 3.0,
            "latency_ms_p95": 5.0,
            "rows": 30,
            "labels": LABELS,
            "confusion": CONFUSION,
        },
    )
    checked = services.promotion_check(promotion_id=promotion.pk)
    assert checked is not None
    return checked


@pytest.fixture
def candidate(
    scientist: Actor, reviewer: Actor, tenant: Tenant, artifacts_dir: Any
) -> ModelVersion:
    make_training_version(reviewer, name="golden", kind="golden")
    return make_version(scientist, tenant)


def request_promotion(actor: Actor, tenant: Tenant, version: ModelVersion) -> PromotionRequest:
    return services.promotion_request(
        actor=actor.user, tenant=tenant, model_version=version, target="staging", via="test"
    )


@pytest.fixture
def awaiting(scientist: Actor, tenant: Tenant, candidate: ModelVersion) -> PromotionRequest:
    promotion = finish(request_promotion(scientist, tenant, candidate), macro_f1=0.9)
    assert promotion.status == "awaiting_approval"
    return promotion


def messages_of(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


# --- pages and isolation ------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("who", ["admin", "reviewer", "scientist", "viewer"])
def test_pages_open_for_every_member(awaiting, who, request):
    client = login(request.getfixturevalue(who))
    for path, marker in [
        (f"{BASE}/reviews/", "review-queue-page"),
        (f"{BASE}/reviews/{awaiting.pk}/", "review-detail-page"),
        (f"{BASE}/policies/", "policies-page"),
    ]:
        response = client.get(path)
        assert response.status_code == 200, path
        assert f'id="{marker}"' in response.content.decode()


@pytest.mark.django_db
def test_outsider_gets_404_everywhere(awaiting, outsider):
    client = login(outsider)
    for path in [f"{BASE}/reviews/", f"{BASE}/reviews/{awaiting.pk}/", f"{BASE}/policies/"]:
        assert client.get(path).status_code == 404, path
    for action in ("approve", "reject"):
        assert client.post(f"{BASE}/reviews/{awaiting.pk}/{action}/").status_code == 404
    assert PromotionRequest.objects.get(pk=awaiting.pk).status == "awaiting_approval"


@pytest.mark.django_db
def test_a_request_of_another_tenant_is_404(awaiting, outsider, reviewer):
    # The outsider's own tenant page does not serve acme's request either.
    assert login(outsider).get(f"/t/globex/reviews/{awaiting.pk}/").status_code == 404
    assert login(reviewer).get(f"{BASE}/reviews/prm_nope/").status_code == 404


@pytest.mark.django_db
def test_anonymous_is_sent_to_login(awaiting):
    response = Client().get(f"{BASE}/reviews/")
    assert response.status_code == 302 and "/login/" in response["Location"]


@pytest.mark.django_db
def test_nav_links_reviews_and_policies(reviewer, tenant):
    body = login(reviewer).get(f"{BASE}/reviews/").content.decode()
    assert f'href="{BASE}/reviews/" aria-current="page">Reviews<' in body
    assert f'href="{BASE}/policies/"' in body


# --- the queue ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_queue_counts_and_filter(awaiting, scientist, tenant, reviewer):
    other = make_version(scientist, tenant, sha="ef")
    failed = finish(request_promotion(scientist, tenant, other), macro_f1=0.2)
    assert failed.status == "gates_failed"
    checking = make_version(scientist, tenant, sha="ab")
    pending = request_promotion(scientist, tenant, checking)

    client = login(reviewer)
    response = client.get(f"{BASE}/reviews/")
    assert response.context["counts"] == {
        "awaiting_approval": 1,
        "checking": 1,
        "gates_failed": 1,
        "deploying": 0,
        "done": 0,
        "failed": 0,
        "approved": 0,
        "rejected": 0,
    }
    body = response.content.decode()
    assert re.search(r'id="count-awaiting_approval">1<', body)
    # Default: awaiting approval only.
    assert [r.promotion.pk for r in response.context["rows"]] == [awaiting.pk]
    row = re.search(rf'<tr data-promotion="{awaiting.pk}".*?</tr>', body, re.S)
    assert row is not None
    assert f"{awaiting.model_version.registered_model.name} v1" in row.group(0)
    assert "sam" in row.group(0) and "staging" in row.group(0)
    assert 'data-status="awaiting_approval"' in row.group(0)
    assert "2 pass" in row.group(0) and "0 fail" in row.group(0)

    failed_page = client.get(f"{BASE}/reviews/?status=gates_failed")
    assert [r.promotion.pk for r in failed_page.context["rows"]] == [failed.pk]
    assert "1 fail" in failed_page.content.decode()
    every = client.get(f"{BASE}/reviews/?status=all")
    assert {r.promotion.pk for r in every.context["rows"]} == {awaiting.pk, failed.pk, pending.pk}
    # A checking request on the page refreshes it.
    assert 'http-equiv="refresh"' in client.get(f"{BASE}/reviews/?status=checking").content.decode()
    # A bad status falls back to the default.
    assert client.get(f"{BASE}/reviews/?status=nope").context["status"] == "awaiting_approval"


@pytest.mark.django_db
def test_reviewer_approves_from_the_queue(awaiting, reviewer, candidate):
    client = login(reviewer)
    body = client.get(f"{BASE}/reviews/").content.decode()
    approve_url = f"{BASE}/reviews/{awaiting.pk}/approve/"
    assert f'action="{approve_url}"' in body and "data-confirm=" in body
    response = client.post(approve_url, {"comment": "ship it", "back": "queue"}, follow=True)
    assert response.redirect_chain[-1][0] == f"{BASE}/reviews/"
    assert any("approved for staging" in m for m in messages_of(response))
    promotion = PromotionRequest.objects.get(pk=awaiting.pk)
    assert promotion.status == "deploying" and promotion.decided_by == reviewer.user
    assert promotion.decision_comment == "ship it"
    candidate.refresh_from_db()
    assert candidate.stage == "staging"
    assert AuditEvent.objects.filter(object_id=awaiting.pk, verb="promotion.approved").exists()
    assert response.context["counts"]["deploying"] == 1


@pytest.mark.django_db
def test_reviewer_rejects_from_the_detail_page(awaiting, admin):
    url = f"{BASE}/reviews/{awaiting.pk}/reject/"
    response = login(admin).post(url, {"comment": "not yet"}, follow=True)
    assert response.redirect_chain[-1][0] == f"{BASE}/reviews/{awaiting.pk}/"
    assert PromotionRequest.objects.get(pk=awaiting.pk).status == "rejected"
    body = response.content.decode()
    assert "rejected by ada" in body and "not yet" in body
    assert 'class="decision-form' not in body  # decided: no more buttons


@pytest.mark.django_db
def test_requester_sees_the_four_eyes_error(scientist, reviewer, tenant, candidate):
    promotion = finish(request_promotion(reviewer, tenant, candidate), macro_f1=0.9)
    client = login(reviewer)
    queue = client.get(f"{BASE}/reviews/").content.decode()
    assert "another reviewer decides" in queue
    assert f"{BASE}/reviews/{promotion.pk}/approve/" not in queue
    response = client.post(f"{BASE}/reviews/{promotion.pk}/approve/", {}, follow=True)
    assert any("another reviewer must decide it" in m for m in messages_of(response))
    assert 'class="message message-error"' in response.content.decode()
    assert PromotionRequest.objects.get(pk=promotion.pk).status == "awaiting_approval"


@pytest.mark.django_db
@pytest.mark.parametrize("who", ["viewer", "scientist"])
def test_viewer_and_scientist_see_no_buttons_and_get_403(awaiting, who, request):
    client = login(request.getfixturevalue(who))
    for path in (f"{BASE}/reviews/", f"{BASE}/reviews/{awaiting.pk}/"):
        body = client.get(path).content.decode()
        assert "/approve/" not in body and "/reject/" not in body
    for action in ("approve", "reject"):
        response = client.post(f"{BASE}/reviews/{awaiting.pk}/{action}/", {"comment": "x"})
        assert response.status_code == 403
        assert "reviewer" in response.content.decode()
    assert PromotionRequest.objects.get(pk=awaiting.pk).status == "awaiting_approval"


@pytest.mark.django_db
def test_a_second_decision_shows_the_conflict(awaiting, reviewer, admin):
    url = f"{BASE}/reviews/{awaiting.pk}/approve/"
    assert login(reviewer).post(url, {}).status_code == 302
    response = login(admin).post(url, {}, follow=True)
    errors = messages_of(response)
    assert any("This request is deploying" in m for m in errors), errors
    assert AuditEvent.objects.filter(object_id=awaiting.pk, verb="promotion.approved").count() == 1


@pytest.mark.django_db
def test_get_on_a_decision_url_is_refused(awaiting, reviewer):
    assert login(reviewer).get(f"{BASE}/reviews/{awaiting.pk}/approve/").status_code == 405


# --- requesting ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_scientist_requests_a_promotion_from_the_queue(scientist, candidate):
    client = login(scientist)
    page = client.get(f"{BASE}/reviews/")
    assert 'id="promotion-request-form"' in page.content.decode()
    response = client.post(
        f"{BASE}/reviews/", {"model_version": candidate.pk, "target": "staging"}, follow=True
    )
    promotion = PromotionRequest.objects.get()
    assert response.redirect_chain[-1][0] == f"{BASE}/reviews/{promotion.pk}/"
    assert promotion.requested_by == scientist.user and promotion.status == "checking"
    body = response.content.decode()
    assert 'http-equiv="refresh"' in body  # checking: the page refreshes itself
    # A second open request for the same target is the service's conflict, shown inline.
    again = client.post(f"{BASE}/reviews/", {"model_version": candidate.pk, "target": "staging"})
    assert again.status_code == 400
    assert "already has an open staging request" in again.content.decode()


@pytest.mark.django_db
def test_viewer_cannot_request_and_foreign_versions_are_refused(
    viewer, scientist, candidate, outsider
):
    assert (
        'id="promotion-request-form"' not in login(viewer).get(f"{BASE}/reviews/").content.decode()
    )
    data = {"model_version": candidate.pk, "target": "staging"}
    assert login(viewer).post(f"{BASE}/reviews/", data).status_code == 403
    # A version id of another tenant is not a choice.
    bad = login(outsider).post("/t/globex/reviews/", data)
    assert bad.status_code == 400 and not PromotionRequest.objects.exists()


# --- the request's page -------------------------------------------------------------------


@pytest.mark.django_db
def test_detail_shows_gates_metrics_heatmap_and_provenance(awaiting, reviewer, candidate):
    body = login(reviewer).get(f"{BASE}/reviews/{awaiting.pk}/").content.decode()
    table = re.search(r'<table class="table" id="gates-table">.*?</table>', body, re.S)
    assert table is not None
    assert table.group(0).count('data-passed="true"') == 2
    assert "macro_f1" in table.group(0) and "golden" in table.group(0)
    assert "0.7" in table.group(0) and "0.9" in table.group(0)
    (evaluation_id,) = awaiting.evaluation_ids
    svg = re.search(rf'<svg id="confusion-{evaluation_id}".*?</svg>', body, re.S)
    assert svg is not None
    assert svg.group(0).count('<rect class="cell') == len(LABELS) ** 2
    for label in LABELS:
        assert f">{label}</text>" in svg.group(0)
    assert "true card_lost → predicted balance: 1 (10% of the row)" in svg.group(0)
    assert f'id="metrics-{evaluation_id}"' in body and "Macro-F1" in body
    assert candidate.sha256 in body
    assert re.search(r'id="trained-by">sam in', body)
    run = candidate.run
    assert f'href="{BASE}/datasets/{run.dataset_version.dataset_id}/"' in body
    assert f'action="{BASE}/reviews/{awaiting.pk}/approve/"' in body
    assert f'action="{BASE}/reviews/{awaiting.pk}/reject/"' in body
    assert 'http-equiv="refresh"' not in body


@pytest.mark.django_db
def test_detail_of_failed_gates_colours_the_failing_gate(scientist, tenant, candidate, reviewer):
    promotion = finish(request_promotion(scientist, tenant, candidate), macro_f1=0.3)
    body = login(reviewer).get(f"{BASE}/reviews/{promotion.pk}/").content.decode()
    assert 'class="gate gate-failed" data-passed="false"' in body
    assert '<span class="badge gate-fail">fail</span>' in body
    assert "/approve/" not in body  # nothing to decide


@pytest.mark.django_db
def test_detail_shows_the_failure_text(scientist, tenant, candidate, reviewer):
    promotion = request_promotion(scientist, tenant, candidate)
    Evaluation.objects.filter(pk__in=promotion.evaluation_ids).update(
        status=EvalStatus.FAILED, error="CUDA out of memory"
    )
    services.promotion_check(promotion_id=promotion.pk)
    body = login(reviewer).get(f"{BASE}/reviews/{promotion.pk}/").content.decode()
    assert 'id="promotion-failure"' in body and "CUDA out of memory" in body


@pytest.mark.django_db
def test_champion_metrics_side_by_side(awaiting, reviewer, scientist, tenant):
    # Approve to production so the candidate becomes the champion of the next version.
    PromotionRequest.objects.filter(pk=awaiting.pk).update(target="production")
    services.promotion_approve(actor=reviewer.user, promotion=awaiting)
    challenger = make_version(scientist, tenant, sha="ef")
    assert challenger.registered_model_id == awaiting.model_version.registered_model_id
    promotion = finish(request_promotion(scientist, tenant, challenger), macro_f1=0.95)
    assert promotion.champion_id == awaiting.model_version_id
    body = login(reviewer).get(f"{BASE}/reviews/{promotion.pk}/").content.decode()
    (evaluation_id,) = promotion.evaluation_ids
    table = re.search(rf'id="metrics-{evaluation_id}".*?</table>', body, re.S)
    assert table is not None
    assert '<td class="num better">0.95</td>' in table.group(0)
    assert '<td class="num">0.9</td>' in table.group(0)


def test_heatmap_geometry_and_malformed_input():
    heat = confusion_heatmap(chart_id="c", title="t", labels=LABELS, matrix=CONFUSION)
    assert heat is not None and len(heat.cells) == 9
    diagonal = [c for c in heat.cells if c.diagonal]
    assert [c.count for c in diagonal] == [8, 9, 8]
    assert all(c.fill.startswith("rgb(") for c in heat.cells)
    empty_row = confusion_heatmap(
        chart_id="c", title="t", labels=["a", "b"], matrix=[[0, 0], [1, 1]]
    )
    assert empty_row is not None and empty_row.cells[0].share == 0.0
    assert confusion_heatmap(chart_id="c", title="t", labels=["a"], matrix=[[1, 2]]) is None
    assert confusion_heatmap(chart_id="c", title="t", labels=[], matrix=[]) is None


# --- policies -----------------------------------------------------------------------------


def policy_post(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "gates-TOTAL_FORMS": "2",
        "gates-INITIAL_FORMS": "0",
        "gates-MIN_NUM_FORMS": "0",
        "gates-MAX_NUM_FORMS": "5",
        "gates-0-metric": "macro_f1",
        "gates-0-op": ">=",
        "gates-0-value": "0.85",
        "gates-0-dataset": "",
        "gates-1-metric": "",
        "gates-1-op": "",
        "gates-1-value": "",
        "gates-1-dataset": "",
        "max_regression_vs_champion": "0.02",
        "latency_budget_ms": "40",
        "require_staging_before_production": "on",
    }
    data.update(overrides)
    return data


@pytest.mark.django_db
def test_policies_page_shows_every_kind(viewer, tenant):
    body = login(viewer).get(f"{BASE}/policies/").content.decode()
    for kind in ("classifier", "embedding", "autocomplete"):
        assert f'id="policy-{kind}"' in body
    assert 'id="policy-form"' not in body  # read-only for a viewer


@pytest.mark.django_db
def test_admin_edits_the_classifier_policy(admin, reviewer, tenant, artifacts_dir):
    golden = DatasetVersion.objects.get(
        pk=make_training_version(reviewer, name="golden", kind="golden")
    ).dataset_id
    client = login(admin)
    page = client.get(f"{BASE}/policies/").content.decode()
    assert 'id="policy-form"' in page and f'value="{golden}"' in page
    response = client.post(
        f"{BASE}/policies/",
        policy_post(**{"gates-1-metric": "latency_ms_p95", "gates-1-op": "<=",
                       "gates-1-value": "30", "gates-1-dataset": golden}),
        follow=True,
    )  # fmt: skip
    assert any("saved" in m for m in messages_of(response))
    policy = PromotionPolicy.objects.get(tenant=tenant, model_kind="classifier")
    assert policy.gates == [
        {"metric": "macro_f1", "op": ">=", "value": 0.85, "dataset": None},
        {"metric": "latency_ms_p95", "op": "<=", "value": 30.0, "dataset": golden},
    ]
    assert policy.max_regression_vs_champion == 0.02 and policy.latency_budget_ms == 40.0
    assert policy.require_staging_before_production is True
    event = AuditEvent.objects.get(verb="policy.update")
    assert event.actor == admin.user and event.via == "session"


@pytest.mark.django_db
def test_removing_a_gate_and_skipping_blank_rows(admin, tenant):
    client = login(admin)
    data = policy_post(**{"gates-0-DELETE": "on"})
    assert client.post(f"{BASE}/policies/", data).status_code == 302
    assert PromotionPolicy.objects.get(tenant=tenant, model_kind="classifier").gates == []


@pytest.mark.django_db
def test_scientist_cannot_edit_policies(scientist, tenant):
    response = login(scientist).post(f"{BASE}/policies/", policy_post())
    assert response.status_code == 403
    assert not PromotionPolicy.objects.filter(tenant=tenant).exists()


@pytest.mark.django_db
def test_a_bad_gate_value_is_shown_inline(admin, tenant):
    response = login(admin).post(f"{BASE}/policies/", policy_post(**{"gates-0-value": "1.5"}))
    assert response.status_code == 400
    body = response.content.decode()
    assert 'id="gates-0-value-errors"' in body and "between 0 and 1" in body
    not_a_number = login(admin).post(f"{BASE}/policies/", policy_post(**{"gates-0-value": "x"}))
    assert not_a_number.status_code == 400 and "Enter a number." in not_a_number.content.decode()
    assert not PromotionPolicy.objects.filter(tenant=tenant).exists()


# --- four eyes without gaps, on the review page -------------------------------------------


@pytest.mark.django_db
def test_detail_shows_the_exact_dataset_versions_the_gates_used(awaiting, reviewer):
    golden = DatasetVersion.objects.get(dataset__name="golden")
    body = login(reviewer).get(f"{BASE}/reviews/{awaiting.pk}/").content.decode()
    table = re.search(r'<table class="table" id="gate-datasets-table">.*?</table>', body, re.S)
    assert table is not None
    rows = re.findall(r'<tr class="gate-dataset" data-version="([^"]+)">(.*?)</tr>',
                      table.group(0), re.S)  # fmt: skip
    assert [version for version, _ in rows] == [golden.pk]
    ((_, row),) = rows
    assert ">golden</a>" in row and "v1" in row and f'title="{golden.sha256}"' in row
    assert "rita" in row  # who uploaded that version
    assert f'href="{BASE}/datasets/{golden.dataset_id}/?v=1"' in row


@pytest.mark.django_db
def test_a_request_whose_requester_is_unknown_offers_no_decision(awaiting, reviewer, scientist):
    scientist.user.delete()
    client = login(reviewer)
    body = client.get(f"{BASE}/reviews/{awaiting.pk}/").content.decode()
    assert 'id="requester-unknown-note"' in body
    assert f'action="{BASE}/reviews/{awaiting.pk}/approve/"' not in body
    queue = client.get(f"{BASE}/reviews/").content.decode()
    assert f'action="{BASE}/reviews/{awaiting.pk}/approve/"' not in queue
    response = client.post(f"{BASE}/reviews/{awaiting.pk}/approve/", {"comment": ""}, follow=True)
    assert any("request the promotion again" in m for m in messages_of(response))
    assert PromotionRequest.objects.get(pk=awaiting.pk).status == "awaiting_approval"


@pytest.mark.django_db
def test_the_trainer_is_told_and_refused_on_the_review_page(reviewer, scientist, tenant):
    make_training_version(reviewer, name="golden", kind="golden")
    version = make_version(reviewer, tenant)  # the reviewer trained it
    promotion = finish(request_promotion(scientist, tenant, version), macro_f1=0.9)
    client = login(reviewer)
    body = client.get(f"{BASE}/reviews/{promotion.pk}/").content.decode()
    assert 'id="trainer-note"' in body
    response = client.post(f"{BASE}/reviews/{promotion.pk}/approve/", {"comment": ""}, follow=True)
    assert any("You trained this version" in m for m in messages_of(response))
    assert PromotionRequest.objects.get(pk=promotion.pk).status == "awaiting_approval"


@pytest.mark.django_db
def test_admin_lets_trainers_approve_from_the_policy_form(admin, tenant):
    client = login(admin)
    page = client.get(f"{BASE}/policies/").content.decode()
    assert 'name="trainer_may_approve"' in page
    assert "no: another reviewer decides" in page  # the default, shown on the policy
    response = client.post(f"{BASE}/policies/", policy_post(trainer_may_approve="on"))
    assert response.status_code == 302
    assert PromotionPolicy.objects.get(tenant=tenant, model_kind="classifier").trainer_may_approve
    # Unticked again, trainers may not approve.
    assert client.post(f"{BASE}/policies/", policy_post()).status_code == 302
    policy = PromotionPolicy.objects.get(tenant=tenant, model_kind="classifier")
    assert policy.trainer_may_approve is False
