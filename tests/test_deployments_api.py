"""Deployments through the REST API where no fleet is involved: validation, roles, state
errors, the claim that makes the load task safe to repeat, alerts. What needs a fleet (load,
warm-up, predict, rollback, capacity) is in test_deployments_fleet.py, on a real Ray."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import pytest
from django.core import mail
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.datasets.models import DatasetVersion
from apps.deployments import alerts, services
from apps.deployments.models import Deployment, FleetAlert, FleetLease
from apps.registry.models import ModelVersion
from apps.registry.services import model_version_create
from apps.training import services as training
from tests.training_helpers import make_training_version

API = "/api/v1/tenants/acme"

pytestmark = pytest.mark.django_db


def make_version(scientist, tenant, name: str = "intents") -> ModelVersion:
    version = DatasetVersion.objects.get(
        pk=make_training_version(scientist, name=f"data-{uuid4().hex[:8]}")
    )
    run = training.run_launch(actor=scientist.user, tenant=tenant, dataset_version=version,
                              base_model="tiny-bert", params={}, model_name=name)  # fmt: skip
    return model_version_create(
        run=run, artifact_key="models/x/model.tar", sha256="ab" * 32, size_bytes=1,
        memory_bytes=1, predictions_key="models/x/p.jsonl", labels=["a"], metrics={},
    )  # fmt: skip


def deploy(version: ModelVersion, status: str, environment: str = "production", **extra):
    return Deployment.objects.create(
        tenant=version.registered_model.tenant, model_version=version, environment=environment,
        artifact_sha256=version.sha256, status=status, **extra,
    )  # fmt: skip


@pytest.fixture
def version(scientist, tenant, artifacts_dir) -> ModelVersion:
    return make_version(scientist, tenant)


def test_predict_of_another_tenants_model_is_404(version, outsider, other_tenant):
    deploy(version, "warm")
    body = {"inputs": ["where is my card"]}
    # Through the victim's tenant: the outsider cannot see the tenant at all.
    assert outsider.api("post", f"{API}/models/intents/predict", body).status_code == 404
    # Through the outsider's own tenant: the name resolves to nothing.
    own = outsider.api("post", "/api/v1/tenants/globex/models/intents/predict", body)
    assert own.status_code == 404


def test_predict_without_a_warm_deployment_is_409_naming_the_status(version, viewer):
    body = {"inputs": ["where is my card"]}
    none_yet = viewer.api("post", f"{API}/models/intents/predict", body)
    assert none_yet.status_code == 409
    assert none_yet.json()["error"]["status"] == "not_deployed"
    deploy(version, "loading")
    loading = viewer.api("post", f"{API}/models/intents/predict", body)
    assert loading.status_code == 409 and loading.json()["error"]["status"] == "loading"
    assert "no warm deployment in production" in loading.json()["error"]["message"]
    staging = viewer.api(
        "post", f"{API}/models/intents/predict", {**body, "environment": "staging"}
    )
    assert staging.status_code == 409 and staging.json()["error"]["status"] == "not_deployed"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "inputs"),
        ({"inputs": []}, "inputs"),
        ({"inputs": "where is my card"}, "inputs"),
        ({"inputs": [""]}, "inputs"),
        ({"inputs": ["x" * 2001]}, "inputs"),
        ({"inputs": ["ok"] * 65}, "inputs"),
        ({"inputs": ["ok"], "environment": "prod"}, "environment"),
    ],
)
def test_predict_refuses_bad_input_naming_the_field(version, viewer, body, field):
    deploy(version, "warm")
    response = viewer.api("post", f"{API}/models/intents/predict", body)
    assert response.status_code == 400, response.content
    assert field in response.json()["error"]["fields"]


def test_rollback_needs_a_reviewer_and_an_earlier_version(version, scientist, reviewer):
    current = deploy(version, "warm", warm_at=timezone.now())
    url = f"{API}/deployments/{current.pk}/rollback"
    assert scientist.api("post", url).status_code == 403
    response = reviewer.api("post", url)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "no_previous_version"
    assert Deployment.objects.count() == 1


def test_rollback_creates_a_deployment_of_the_replaced_version(
    version, scientist, tenant, reviewer, django_capture_on_commit_callbacks
):
    old = deploy(version, "retired", warm_at=timezone.now() - timedelta(days=1), standby=True)
    newer = make_version(scientist, tenant)
    current = deploy(newer, "warm", warm_at=timezone.now(), replaces=old)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = reviewer.api("post", f"{API}/deployments/{current.pk}/rollback")
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["model_version"] == version.pk and body["status"] == "pending"
    assert body["is_rollback"] is True and body["replaces"] == current.pk
    assert len(callbacks) == 1  # the load task, enqueued on commit
    # The current deployment serves until the rollback is warm.
    current.refresh_from_db()
    assert current.status == "warm"
    assert AuditEvent.objects.filter(verb="deployment.rollback", object_id=body["id"]).exists()
    # A second rollback while the first is loading is refused.
    again = reviewer.api("post", f"{API}/deployments/{current.pk}/rollback")
    assert again.status_code == 409 and again.json()["error"]["code"] == "deployment_in_progress"


def test_state_errors_are_409_and_change_nothing(version, reviewer, scientist):
    loading = deploy(version, "loading")
    retire = reviewer.api("post", f"{API}/deployments/{loading.pk}/retire")
    assert retire.status_code == 409 and retire.json()["error"]["status"] == "loading"
    warmup = scientist.api("post", f"{API}/deployments/{loading.pk}/warmup")
    assert warmup.status_code == 409
    loading.refresh_from_db()
    assert loading.status == "loading"
    assert not AuditEvent.objects.filter(object_id=loading.pk).exists()


def test_retire_takes_a_warm_version_off_and_asks_the_fleet_to_unload_it(
    version, reviewer, django_capture_on_commit_callbacks
):
    warm = deploy(version, "warm", warm_at=timezone.now())
    FleetLease.objects.create(pk="fleet", generation=7)
    with django_capture_on_commit_callbacks(execute=True):
        response = reviewer.api("post", f"{API}/deployments/{warm.pk}/retire")
    assert response.status_code == 200
    assert response.json()["status"] == "retired" and response.json()["standby"] is False
    # The fleet controller is told at once (it unloads what is no longer desired).
    assert FleetLease.objects.get(pk="fleet").generation == 8
    again = reviewer.api("post", f"{API}/deployments/{warm.pk}/retire")
    assert again.status_code == 409


def test_list_filters_and_detail(version, viewer, scientist, tenant):
    deploy(version, "failed", failure="insufficient capacity: need 2 bytes, have 1 bytes")
    other = make_version(scientist, tenant, name="other")
    warm = deploy(other, "warm", environment="staging")
    rows = viewer.api("get", f"{API}/deployments/?status=warm").json()["results"]
    assert [r["id"] for r in rows] == [warm.pk]
    rows = viewer.api("get", f"{API}/deployments/?environment=production").json()["results"]
    assert [r["status"] for r in rows] == ["failed"]
    assert "insufficient capacity" in rows[0]["failure"]
    rows = viewer.api("get", f"{API}/deployments/?model=other").json()["results"]
    assert [r["model"] for r in rows] == ["other"]
    detail = viewer.api("get", f"{API}/deployments/{warm.pk}/").json()
    assert detail["warmups"] == [] and detail["alerts"] == []
    assert viewer.api("get", f"{API}/deployments/dep_nope/").status_code == 404


def test_the_load_claim_is_exclusive_and_refuses_changed_bytes(version, scientist, tenant):
    pending = deploy(version, "pending")
    first = services.deployment_claim(deployment_id=pending.pk)
    assert first is not None and first.status == "loading" and first.load_attempts == 1
    assert services.deployment_claim(deployment_id=pending.pk) is None
    changed = deploy(make_version(scientist, tenant, name="changed"), "pending")
    Deployment.objects.filter(pk=changed.pk).update(artifact_sha256="cd" * 32)
    refused = services.deployment_claim(deployment_id=changed.pk)
    assert refused is not None and refused.status == "failed"
    assert "bytes changed since they were approved" in refused.failure


def test_a_load_without_progress_is_retried_then_failed_naming_why(version, settings):
    settings.DEPLOYMENT_LOAD_ATTEMPTS = 3
    loading = services.deployment_claim(deployment_id=deploy(version, "pending").pk)
    assert loading is not None
    for attempt in (2, 3):
        loading = services.deployment_load_retry(deployment=loading, outcome="timeout")
        assert loading.status == "loading" and loading.load_attempts == attempt
    failed = services.deployment_load_retry(deployment=loading, outcome="timeout")
    assert failed.status == "failed"
    assert failed.failure.startswith("the model was not loaded after 3 attempts of ")
    assert AuditEvent.objects.filter(verb="deployment.failed", object_id=failed.pk).count() == 1


def test_an_alert_mails_the_admins_once_is_audited_and_counted_on_metrics(
    version, admin, client, django_capture_on_commit_callbacks
):
    warm = deploy(version, "warm")
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        first = alerts.alert_raise(
            tenant=warm.tenant,
            deployment=warm,
            kind="warmup_failed",
            message="Warm-up of intents v1 failed: 3 of 16 differ",
        )
        again = alerts.alert_raise(
            tenant=warm.tenant, deployment=warm, kind="warmup_failed", message="still failing"
        )
    assert first.pk == again.pk and FleetAlert.objects.count() == 1
    assert [m.to for m in mail.outbox] == [["ada@example.com"]]
    assert "3 of 16 differ" in mail.outbox[0].body
    assert AuditEvent.objects.filter(verb="alert.raised", object_id=first.pk).count() == 1
    metrics = client.get("/metrics").content.decode()
    assert 'workbench_fleet_open_alerts{kind="warmup_failed"} 1.0' in metrics
    assert alerts.alerts_resolve(deployment=warm, kind="warmup_failed") == 1
    metrics = client.get("/metrics").content.decode()
    assert 'workbench_fleet_open_alerts{kind="warmup_failed"} 0.0' in metrics


# --- warm-up samples: the tenant's own golden sets only ----------------------------------

SHARED_TEXT = "shared-set row: staff eyes only"


def shared_golden_version(staff) -> DatasetVersion:
    """A staff-owned golden set of acme's domain, uploaded as staff do."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    created = staff.api("post", "/api/v1/shared-datasets/",
                        {"name": "banking-shared", "domain": "banking"})  # fmt: skip
    assert created.status_code == 201, created.content
    dataset = created.json()["id"]
    body = f"text,label\n{SHARED_TEXT},card\nanother shared row,cash\n".encode()
    upload = staff.client.post(f"/api/v1/shared-datasets/{dataset}/versions/",
                               {"file": SimpleUploadedFile("shared.csv", body)})  # fmt: skip
    assert upload.status_code == 201, upload.content
    return DatasetVersion.objects.get(pk=upload.json()["id"])


def test_warmup_samples_come_only_from_the_tenants_own_golden_sets(version, reviewer, staff):
    from apps.deployments.selectors import warmup_samples
    from apps.evaluation.models import Evaluation

    own = DatasetVersion.objects.get(
        pk=make_training_version(reviewer, name="own-golden", kind="golden")
    )
    shared = shared_golden_version(staff)
    now = timezone.now()
    # Evaluated on both, as a promotion request does; the shared set's evaluation finished
    # last, so it is the newest one with samples.
    for dataset_version, text, finished in [
        (own, "where is my new card", now - timedelta(minutes=5)),
        (shared, SHARED_TEXT, now),
    ]:
        Evaluation.objects.create(
            tenant=version.registered_model.tenant, model_version=version,
            dataset_version=dataset_version, status="succeeded", artifact_sha256=version.sha256,
            metrics={"macro_f1": 0.9}, finished_at=finished,
            samples=[{"text": text, "label": "a", "predicted": "a", "score": 0.9}],
        )  # fmt: skip
    samples = warmup_samples(version, 16)
    assert [s["text"] for s in samples] == ["where is my new card"]


def test_approving_a_version_already_deployed_there_is_409_and_changes_nothing(
    version, scientist, reviewer
):
    from apps.promotions.models import PromotionRequest

    serving = deploy(version, "warm", environment="staging")
    # Requested again for staging (the first request is done), and approved.
    again = PromotionRequest.objects.create(
        tenant=version.registered_model.tenant, model_version=version, target="staging",
        artifact_sha256=version.sha256, status="awaiting_approval", requested_by=scientist.user,
    )  # fmt: skip
    response = reviewer.api("post", f"{API}/promotions/{again.pk}/approve", {"comment": "ok"})
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "already_deployed"
    assert serving.pk in response.json()["error"]["message"]
    again.refresh_from_db()
    assert again.status == "awaiting_approval"
    assert list(Deployment.objects.filter(model_version=version)) == [serving]
