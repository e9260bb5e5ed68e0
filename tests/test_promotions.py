"""Promotion gates, four eyes and one decision under concurrency."""

from __future__ import annotations

import threading

import pytest
from django.core import mail
from django.db import connection

from apps.audit.models import AuditEvent
from apps.deployments.models import Deployment
from apps.evaluation.models import EvalStatus, Evaluation
from apps.promotions import services
from apps.promotions.gates import check_gates
from apps.promotions.models import PromotionRequest
from apps.registry.models import ModelVersion
from apps.tenants.models import Role
from tests.conftest import make_actor
from tests.training_helpers import make_training_version, placeholder_version

API = "/api/v1/tenants/acme"


# --- gates, as plain functions ----------------------------------------------------------

RESULTS = {
    "ds_a": {"dataset_name": "a", "macro_f1": 0.9, "latency_ms_p95": 12.0},
    "ds_b": {"dataset_name": "b", "macro_f1": 0.8, "latency_ms_p95": 30.0},
}


def test_a_gate_without_dataset_applies_to_every_dataset():
    rows = check_gates(gates=[{"metric": "macro_f1", "op": ">=", "value": 0.85}], results=RESULTS)
    assert [(r["dataset"], r["passed"]) for r in rows] == [("ds_a", True), ("ds_b", False)]
    failing = rows[1]
    assert failing["threshold"] == 0.85 and failing["value"] == 0.8


def test_a_gate_naming_an_unevaluated_dataset_fails():
    rows = check_gates(gates=[{"metric": "macro_f1", "op": ">=", "value": 0.1,
                               "dataset": "ds_zzz"}], results=RESULTS)  # fmt: skip
    assert rows[0]["passed"] is False and rows[0]["value"] is None


def test_latency_budget_and_regression_vs_champion():
    champion = {"ds_a": {"macro_f1": 0.91}, "ds_b": {"macro_f1": 0.85}}
    rows = check_gates(gates=[], results=RESULTS, latency_budget_ms=20, max_regression=0.02,
                       champion=champion)  # fmt: skip
    by = {(r["gate"], r["dataset"]): r["passed"] for r in rows}
    assert by[("latency budget", "ds_a")] and not by[("latency budget", "ds_b")]
    assert by[("regression vs champion", "ds_a")]  # 0.90 >= 0.91 - 0.02
    assert not by[("regression vs champion", "ds_b")]  # 0.80 < 0.85 - 0.02


# --- the state machine, with evaluations recorded as the worker would ---------------------


@pytest.fixture
def candidate(scientist, tenant, artifacts_dir) -> ModelVersion:
    return placeholder_version(scientist, tenant, sha256="cd" * 32)


def finish_evaluations(promotion_id: str, *, macro_f1: float, latency: float = 5.0) -> None:
    promotion = PromotionRequest.objects.get(pk=promotion_id)
    Evaluation.objects.filter(pk__in=promotion.evaluation_ids).update(
        status=EvalStatus.SUCCEEDED,
        metrics={"accuracy": macro_f1, "macro_f1": macro_f1, "latency_ms_p95": latency},
    )
    services.promotion_check(promotion_id=promotion_id)


@pytest.fixture
def requested(db, scientist, reviewer, candidate) -> str:
    make_training_version(reviewer, name="golden", kind="golden")
    response = scientist.api(
        "post", f"{API}/promotions/", {"model_version": candidate.pk, "target": "staging"}
    )
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["status"] == "checking" and len(body["evaluation_ids"]) == 1
    return str(body["id"])


@pytest.mark.django_db
def test_failing_gates_end_in_gates_failed_with_each_gate(requested, scientist):
    finish_evaluations(requested, macro_f1=0.3)
    body = scientist.api("get", f"{API}/promotions/{requested}/").json()
    assert body["status"] == "gates_failed"
    failing = [g for g in body["gate_results"] if not g["passed"]]
    assert failing[0]["metric"] == "macro_f1" and failing[0]["value"] == 0.3
    assert failing[0]["threshold"] == 0.7


@pytest.mark.django_db
def test_passing_gates_await_a_reviewer_who_is_notified(
    requested, scientist, django_capture_on_commit_callbacks
):
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        finish_evaluations(requested, macro_f1=0.9)
    assert PromotionRequest.objects.get(pk=requested).status == "awaiting_approval"
    assert any("rita@example.com" in m.to for m in mail.outbox)


@pytest.mark.django_db
def test_requester_cannot_approve_own_request(requested, reviewer, candidate):
    finish_evaluations(requested, macro_f1=0.9)
    PromotionRequest.objects.filter(pk=requested).update(requested_by=reviewer.user)
    response = reviewer.api("post", f"{API}/promotions/{requested}/approve", {"comment": "lgtm"})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "four_eyes"
    assert PromotionRequest.objects.get(pk=requested).status == "awaiting_approval"


@pytest.mark.django_db
@pytest.mark.parametrize("who", ["viewer", "scientist"])
def test_viewer_and_scientist_cannot_approve(requested, who, request):
    finish_evaluations(requested, macro_f1=0.9)
    actor = request.getfixturevalue(who)
    response = actor.api("post", f"{API}/promotions/{requested}/approve", {})
    assert response.status_code == 403
    assert "'reviewer'" in response.json()["error"]["message"]


@pytest.mark.django_db
def test_approval_sets_the_stage_and_a_second_decision_is_409(
    requested, reviewer, admin, candidate, django_capture_on_commit_callbacks
):
    finish_evaluations(requested, macro_f1=0.9)
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        response = reviewer.api("post", f"{API}/promotions/{requested}/approve", {"comment": "ok"})
    assert response.status_code == 200, response.content
    body = response.json()
    # Approved, and on its way to the fleet: the request follows its deployment.
    assert body["status"] == "deploying" and body["decided_by"] == "rita"
    assert body["artifact_sha256"] == candidate.sha256
    deployment = Deployment.objects.get(promotion_id=requested)
    assert deployment.status == "pending" and deployment.environment == "staging"
    assert deployment.artifact_sha256 == candidate.sha256
    candidate.refresh_from_db()
    assert candidate.stage == "staging" and "staging" in candidate.aliases
    again = admin.api("post", f"{API}/promotions/{requested}/reject", {"comment": "no"})
    assert again.status_code == 409 and again.json()["error"]["status"] == "deploying"
    assert AuditEvent.objects.filter(object_id=requested, verb="promotion.approved").count() == 1
    (told,) = [m for m in mail.outbox if "sam@example.com" in m.to]
    assert told.subject == "[workbench] your staging request was approved"
    assert "being deployed to staging" in told.body


@pytest.mark.django_db
def test_rejected_stays_rejected_and_a_new_request_is_allowed(
    requested, reviewer, scientist, candidate
):
    finish_evaluations(requested, macro_f1=0.9)
    assert reviewer.api("post", f"{API}/promotions/{requested}/reject", {}).status_code == 200
    assert reviewer.api("post", f"{API}/promotions/{requested}/approve", {}).status_code == 409
    again = scientist.api(
        "post", f"{API}/promotions/", {"model_version": candidate.pk, "target": "staging"}
    )
    assert again.status_code == 202
    # The evaluation of these same bytes is reused, not run again.
    assert (
        again.json()["evaluation_ids"] == PromotionRequest.objects.get(pk=requested).evaluation_ids
    )


@pytest.mark.django_db
def test_a_second_open_request_for_the_same_target_is_409(requested, scientist, candidate):
    response = scientist.api(
        "post", f"{API}/promotions/", {"model_version": candidate.pk, "target": "staging"}
    )
    assert response.status_code == 409


@pytest.mark.django_db
def test_policy_can_require_staging_before_production(admin, scientist, reviewer, candidate):
    make_training_version(reviewer, name="golden", kind="golden")
    admin.api(
        "put",
        f"{API}/policies/classifier/",
        {"gates": [], "require_staging_before_production": True},
    )
    response = scientist.api(
        "post", f"{API}/promotions/", {"model_version": candidate.pk, "target": "production"}
    )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "needs_staging"


@pytest.mark.django_db(transaction=True)
def test_two_reviewers_at_the_same_moment_make_exactly_one_decision(requested, reviewer, admin):
    if connection.vendor != "postgresql":
        pytest.skip("row locks need PostgreSQL (SQLite serialises whole-database writes)")
    finish_evaluations(requested, macro_f1=0.9)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def decide(actor, approve: bool) -> None:
        from django.db import connections

        barrier.wait()
        try:
            promotion = PromotionRequest.objects.get(pk=requested)
            if approve:
                services.promotion_approve(actor=actor.user, promotion=promotion)
            else:
                services.promotion_reject(actor=actor.user, promotion=promotion)
            outcomes.append("decided")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=decide, args=(reviewer, True)),
               threading.Thread(target=decide, args=(admin, False))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["DomainError", "decided"]
    decisions = AuditEvent.objects.filter(
        object_id=requested, verb__in=["promotion.approved", "promotion.rejected"]
    )
    assert decisions.count() == 1


# --- four eyes without gaps ---------------------------------------------------------------


@pytest.mark.django_db
def test_no_decision_on_a_promotion_whose_requester_is_unknown(
    requested, scientist, reviewer, admin
):
    finish_evaluations(requested, macro_f1=0.9)
    scientist.user.delete()  # the requester's account goes: requested_by is set to NULL
    for actor, verb in [(reviewer, "approve"), (admin, "reject")]:
        response = actor.api("post", f"{API}/promotions/{requested}/{verb}", {"comment": "x"})
        assert response.status_code == 409, verb
        error = response.json()["error"]
        assert error["code"] == "requester_unknown"
        assert "request the promotion again" in error["message"]
    assert PromotionRequest.objects.get(pk=requested).status == "awaiting_approval"
    assert not Deployment.objects.filter(promotion_id=requested).exists()
    assert not AuditEvent.objects.filter(
        object_id=requested, verb__in=["promotion.approved", "promotion.rejected"]
    ).exists()


@pytest.fixture
def trained_by_reviewer(reviewer, scientist, tenant, artifacts_dir) -> str:
    """A request, by the scientist, of a version the reviewer trained; gates passed."""
    version = placeholder_version(reviewer, tenant, sha256="ee" * 32)
    make_training_version(reviewer, name="golden", kind="golden")
    response = scientist.api(
        "post", f"{API}/promotions/", {"model_version": version.pk, "target": "staging"}
    )
    assert response.status_code == 202, response.content
    finish_evaluations(response.json()["id"], macro_f1=0.9)
    return str(response.json()["id"])


@pytest.mark.django_db
def test_the_trainer_of_a_version_cannot_approve_it_by_default(
    trained_by_reviewer, reviewer, admin
):
    policy = admin.api("get", f"{API}/policies/classifier/").json()
    assert policy["trainer_may_approve"] is False
    response = reviewer.api("post", f"{API}/promotions/{trained_by_reviewer}/approve", {})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "trainer_cannot_approve"
    assert PromotionRequest.objects.get(pk=trained_by_reviewer).status == "awaiting_approval"
    # Another reviewer may.
    approved = admin.api("post", f"{API}/promotions/{trained_by_reviewer}/approve", {})
    assert approved.status_code == 200, approved.content
    assert approved.json()["decided_by"] == "ada"


@pytest.mark.django_db
def test_a_policy_may_let_the_trainer_approve(trained_by_reviewer, reviewer, admin):
    body = {"gates": [], "trainer_may_approve": True}
    saved = admin.api("put", f"{API}/policies/classifier/", body)
    assert saved.status_code == 200 and saved.json()["trainer_may_approve"] is True
    event = AuditEvent.objects.get(verb="policy.update")
    assert event.before["trainer_may_approve"] is False and event.after["trainer_may_approve"]
    response = reviewer.api("post", f"{API}/promotions/{trained_by_reviewer}/approve", {})
    assert response.status_code == 200, response.content
    # A PUT that leaves the option out restores the default: trainers may not approve.
    again = admin.api("put", f"{API}/policies/classifier/", {"gates": []})
    assert again.json()["trainer_may_approve"] is False


@pytest.mark.django_db
def test_a_version_whose_trainer_is_unknown_is_not_approved(
    reviewer, scientist, tenant, artifacts_dir
):
    trainer = make_actor("tom", tenant, Role.SCIENTIST)
    version = placeholder_version(trainer, tenant, sha256="ea" * 32)
    make_training_version(reviewer, name="golden", kind="golden")
    requested = scientist.api(
        "post", f"{API}/promotions/", {"model_version": version.pk, "target": "staging"}
    ).json()["id"]
    finish_evaluations(requested, macro_f1=0.9)
    trainer.user.delete()
    response = reviewer.api("post", f"{API}/promotions/{requested}/approve", {})
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "trainer_unknown"
    assert PromotionRequest.objects.get(pk=requested).status == "awaiting_approval"


@pytest.mark.django_db
def test_a_promotion_records_the_exact_dataset_versions_its_gates_used(
    requested, scientist, reviewer
):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from apps.datasets.models import DatasetVersion
    from tests.training_helpers import banking_slice

    body = scientist.api("get", f"{API}/promotions/{requested}/").json()
    assert body["gate_dataset_versions"] == []  # recorded when the gates are checked
    finish_evaluations(requested, macro_f1=0.9)
    golden = DatasetVersion.objects.get(dataset__name="golden")
    recorded = [{
        "id": golden.pk, "dataset": golden.dataset_id, "dataset_name": "golden",
        "kind": "golden", "number": 1, "sha256": golden.sha256, "rows": golden.rows,
        "shared": False, "uploaded_by": "rita", "evaluation": body["evaluation_ids"][0],
    }]  # fmt: skip
    body = scientist.api("get", f"{API}/promotions/{requested}/").json()
    assert body["gate_dataset_versions"] == recorded
    # A later version of the golden set changes nothing that was recorded.
    newer = reviewer.client.post(
        f"{API}/datasets/{golden.dataset_id}/versions/",
        {"file": SimpleUploadedFile("g2.csv", banking_slice(per_label=5, offset=60))},
    )
    assert newer.status_code == 201 and newer.json()["number"] == 2
    body = scientist.api("get", f"{API}/promotions/{requested}/").json()
    assert body["gate_dataset_versions"] == recorded
    listed = scientist.api("get", f"{API}/promotions/").json()["results"]
    assert listed[0]["gate_dataset_versions"] == recorded
