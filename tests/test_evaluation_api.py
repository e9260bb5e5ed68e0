"""Evaluations and promotion policies through the API (no worker: the queue is checked)."""

from __future__ import annotations

import pytest

from apps.audit.models import AuditEvent
from apps.evaluation.models import Evaluation, PromotionPolicy
from tests.training_helpers import make_training_version, placeholder_version

pytestmark = pytest.mark.django_db
API = "/api/v1/tenants/acme"


@pytest.fixture
def model_version(scientist, tenant, artifacts_dir):
    return placeholder_version(scientist, tenant, sha256="ab" * 32, labels=("a", "b"))


def test_default_policy_exists_for_a_new_tenant(viewer):
    body = viewer.api("get", f"{API}/policies/classifier/").json()
    metrics = {g["metric"] for g in body["gates"]}
    assert {"macro_f1", "latency_ms_p95"} <= metrics
    listed = viewer.api("get", f"{API}/policies/").json()
    assert {p["model_kind"] for p in listed} == {"classifier", "embedding", "autocomplete"}


def test_admin_edits_a_policy_and_the_change_is_audited(admin, scientist):
    body = {
        "gates": [{"metric": "macro_f1", "op": ">=", "value": 0.85}],
        "max_regression_vs_champion": 0.02,
        "latency_budget_ms": 40,
    }
    refused = scientist.api("put", f"{API}/policies/classifier/", body)
    assert refused.status_code == 403 and "'admin'" in refused.json()["error"]["message"]
    response = admin.api("put", f"{API}/policies/classifier/", body)
    assert response.status_code == 200, response.content
    assert response.json()["gates"][0]["value"] == 0.85
    assert PromotionPolicy.objects.get().max_regression_vs_champion == 0.02
    event = AuditEvent.objects.get(verb="policy.update")
    assert event.after is not None and event.after["gates"][0]["value"] == 0.85
    assert event.before is not None and event.before["gates"][0]["value"] == 0.7


@pytest.mark.parametrize(
    "gates",
    [
        [{"metric": "vibes", "op": ">=", "value": 1}],
        [{"metric": "macro_f1", "op": "~", "value": 1}],
        [{"metric": "macro_f1", "op": ">=", "value": "high"}],
        [{"metric": "macro_f1", "op": ">=", "value": 0.5, "dataset": "ds_nope"}],
    ],
)
def test_bad_gates_are_400_and_change_nothing(admin, gates):
    response = admin.api("put", f"{API}/policies/classifier/", {"gates": gates})
    assert response.status_code == 400
    assert "gates" in response.json()["error"]["fields"]
    assert not PromotionPolicy.objects.exists()


def test_unknown_model_kind_is_404(admin):
    assert admin.api("get", f"{API}/policies/translator/").status_code == 404


def test_evaluation_defaults_to_every_golden_set(
    scientist, reviewer, model_version, django_capture_on_commit_callbacks
):
    make_training_version(reviewer, name="golden-a", kind="golden")
    make_training_version(reviewer, name="golden-b", kind="golden")
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = scientist.api("post", f"{API}/evaluations/", {"model_version": model_version.pk})
    assert response.status_code == 202, response.content
    created = response.json()["evaluations"]
    assert sorted(e["dataset"] for e in created) == ["golden-a", "golden-b"]
    assert all(e["status"] == "queued" and e["artifact_sha256"] == "ab" * 32 for e in created)
    assert len(callbacks) == 2  # one task per dataset, sent after commit


def test_evaluation_without_any_golden_set_is_a_clear_400(scientist, model_version):
    response = scientist.api("post", f"{API}/evaluations/", {"model_version": model_version.pk})
    assert response.status_code == 400
    assert "golden" in response.json()["error"]["message"]
    assert not Evaluation.objects.exists()


def test_foreign_model_version_reads_as_unknown(outsider, model_version):
    response = outsider.api(
        "post", "/api/v1/tenants/globex/evaluations/", {"model_version": model_version.pk}
    )
    assert response.status_code == 400
    assert response.json()["error"]["fields"]["model_version"] == ["No such model version."]


def test_shared_domain_golden_sets_join_every_evaluation_of_that_domain(
    staff, scientist, reviewer, model_version, django_capture_on_commit_callbacks
):
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.training_helpers import banking_slice

    created = staff.api("post", "/api/v1/shared-datasets/",
                        {"name": "banking-golden", "domain": "banking"})  # fmt: skip
    assert created.status_code == 201, created.content
    other = staff.api("post", "/api/v1/shared-datasets/", {"name": "retail-golden",
                                                           "domain": "retail"}).json()  # fmt: skip
    for dataset in (created.json()["id"], other["id"]):
        files = {"file": SimpleUploadedFile("g.csv", banking_slice())}
        upload = staff.client.post(f"/api/v1/shared-datasets/{dataset}/versions/", files)
        assert upload.status_code == 201, upload.content
    make_training_version(reviewer, name="own-golden", kind="golden")
    with django_capture_on_commit_callbacks(execute=False):
        response = scientist.api("post", f"{API}/evaluations/", {"model_version": model_version.pk})
    names = sorted(e["dataset"] for e in response.json()["evaluations"])
    # acme is a banking tenant: its own golden set plus banking's shared one, not retail's.
    assert names == ["banking-golden", "own-golden"]
    # Tenants cannot read shared sets through their dataset endpoints.
    listed = scientist.api("get", f"{API}/datasets/?kind=golden").json()
    assert [d["name"] for d in listed["results"]] == ["own-golden"]
    assert scientist.api("get", "/api/v1/shared-datasets/").status_code == 403
