"""Model health across tenants (staff): the spread of golden metrics over production
versions, regressions against the champion, stale production models, tenants without one."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from apps.datasets.models import DatasetVersion
from apps.evaluation.models import Evaluation
from apps.promotions.models import PromotionRequest
from apps.registry.models import ModelVersion
from apps.tenants.models import Role, Tenant
from apps.tenants.services import membership_add, tenant_create
from tests.conftest import make_actor
from tests.training_helpers import make_training_version

pytestmark = pytest.mark.django_db
HEALTH = "/api/v1/model-health/"


@pytest.fixture
def fleet(tenant, artifacts_dir):
    """acme and beta with a production classifier (macro_f1 0.9 and 0.5 on their golden
    sets; beta's 200 days old), gamma with none; a newer acme version that regressed."""
    tenant_create(actor=None, slug="beta", name="Beta")
    tenant_create(actor=None, slug="gamma", name="Gamma")
    owner = make_actor("olga", tenant, Role.ADMIN)
    membership_add(actor=None, tenant=Tenant.objects.get(slug="beta"), user=owner.user,
                   role=Role.ADMIN)  # fmt: skip
    for slug, f1, sha in (("acme", 0.9, "aa"), ("beta", 0.5, "bb")):
        version = _version(owner, slug, sha)
        ModelVersion.objects.filter(pk=version.pk).update(stage="production")
        golden = make_training_version(owner, tenant=slug, name=f"golden-{sha}", kind="golden")
        Evaluation.objects.create(
            tenant=version.registered_model.tenant, model_version=version,
            dataset_version_id=golden, artifact_sha256=version.sha256, status="succeeded",
            metrics={"macro_f1": f1, "accuracy": f1 + 0.05, "dataset_name": "golden"},
        )  # fmt: skip
    ModelVersion.objects.filter(registered_model__tenant__slug="beta").update(
        created_at=timezone.now() - timedelta(days=200)
    )
    newer = _version(owner, "acme", "cc")
    PromotionRequest.objects.create(
        tenant=Tenant.objects.get(slug="acme"), model_version=newer, target="production",
        artifact_sha256=newer.sha256, status="gates_failed",
        gate_results=[{"gate": "regression vs champion", "dataset": "dv_x",
                       "dataset_name": "golden",
                       "metric": "macro_f1", "op": ">=", "threshold": 0.88, "value": 0.8,
                       "passed": False, "champion_value": 0.9}],
    )  # fmt: skip
    return make_actor("stella", None, None, is_staff=True)


def _version(owner, slug: str, sha: str):
    """A registered classifier version of model "intents" (placeholder artifact keys)."""
    from apps.registry.services import model_version_create
    from apps.training import services as training

    tenant = Tenant.objects.get(slug=slug)
    data = DatasetVersion.objects.get(
        pk=make_training_version(owner, tenant=slug, name=f"train-{sha}")
    )
    run = training.run_launch(actor=owner.user, tenant=tenant, dataset_version=data,
                              base_model="tiny-bert", params={}, model_name="intents")  # fmt: skip
    return model_version_create(
        run=run, artifact_key=f"models/{sha}/model.tar", sha256=sha * 32, size_bytes=1,
        memory_bytes=1, predictions_key=f"models/{sha}/p.jsonl", labels=["a"], metrics={},
    )  # fmt: skip


def test_model_health_spreads_regressions_stale_and_missing(fleet):
    body = fleet.api("get", f"{HEALTH}?kind=classifier&older_than_days=90").json()
    assert body["production_versions"] == 2
    f1 = next(m for m in body["metrics"] if m["metric"] == "macro_f1")
    assert (f1["count"], f1["min"], f1["p50"], f1["max"]) == (2, 0.5, 0.7, 0.9)
    assert f1["histogram"][5] == 1 and f1["histogram"][9] == 1 and sum(f1["histogram"]) == 2
    (regressed,) = body["regressed"]
    assert (regressed["tenant"], regressed["version"], regressed["delta"]) == ("acme", 2, -0.1)
    assert [(s["tenant"], s["age_days"]) for s in body["stale"]] == [("beta", 200)]
    assert body["no_production"] == ["gamma"] and body["no_production_count"] == 1
    # An embedding view of the same fleet: nothing in production, every tenant listed.
    embedding = fleet.api("get", f"{HEALTH}?kind=embedding").json()
    assert embedding["production_versions"] == 0 and embedding["no_production_count"] == 3


def test_model_health_refuses_bad_queries_and_non_staff(fleet, tenant):
    assert fleet.api("get", f"{HEALTH}?kind=toaster").status_code == 400
    assert fleet.api("get", f"{HEALTH}?older_than_days=0").status_code == 400
    admin = make_actor("ada", tenant, Role.ADMIN)
    assert admin.api("get", HEALTH).status_code == 403


def test_the_model_health_page_draws_each_metric_and_lists_the_rest(fleet, tenant):
    client = Client()
    client.force_login(fleet.user)
    page = client.get("/staff/model-health/?kind=classifier").content.decode()
    assert 'data-metric="macro_f1"' in page and page.count('class="histogram-bar"') == 20
    assert 'id="regressed-table"' in page and "-0.100" in page
    assert '<tr data-tenant="beta"><td>beta</td>' in page and "<code>gamma</code>" in page
    assert client.get("/staff/model-health/?kind=toaster").status_code == 400
    other = Client()
    other.force_login(make_actor("ada", tenant, Role.ADMIN).user)
    assert other.get("/staff/model-health/").status_code == 403


def test_the_report_is_served_with_its_age_until_recomputed(fleet, monkeypatch, settings):
    """Computing it reads every production version (a second at 30,000 models): the last
    report is served with its age; ``fresh`` recomputes it now, and an old one is served
    while a worker recomputes it (one refresh sent however often it is read)."""
    from apps.registry import tasks
    from apps.registry.models import HealthReport

    first = fleet.api("get", HEALTH).json()
    assert first["production_versions"] == 2 and first["refreshing"] is False
    assert first["age_seconds"] < 60 and first["took_ms"] > 0
    # gamma gets a production model: the served report does not know yet...
    owner = make_actor("gus", Tenant.objects.get(slug="gamma"), Role.ADMIN)
    ModelVersion.objects.filter(pk=_version(owner, "gamma", "dd").pk).update(stage="production")
    again = fleet.api("get", HEALTH).json()
    assert again["production_versions"] == 2 and again["computed_at"] == first["computed_at"]
    # ...until asked for fresh.
    fresh = fleet.api("get", f"{HEALTH}?fresh=true").json()
    assert fresh["production_versions"] == 3 and fresh["no_production_count"] == 0
    # A report older than the maximum age is served, and one refresh is sent for it.
    sent = []
    monkeypatch.setattr(tasks.refresh_health, "delay", lambda *a: sent.append(a))
    settings.MODEL_HEALTH_MAX_AGE_S = 60
    HealthReport.objects.update(computed_at=timezone.now() - timedelta(minutes=5))
    ModelVersion.objects.filter(registered_model__tenant__slug="gamma").update(stage="archived")
    for _ in range(3):
        old = fleet.api("get", HEALTH).json()
        assert old["production_versions"] == 3 and old["refreshing"] is True
        assert old["age_seconds"] >= 299
    assert sent == [("classifier", 90, 100)]
    # The worker's task (run here) recomputes it; beat's sweep does the same for any other.
    tasks.refresh_health(*sent[0])
    new = fleet.api("get", HEALTH).json()
    assert new["production_versions"] == 2 and new["refreshing"] is False
    HealthReport.objects.update(computed_at=timezone.now() - timedelta(minutes=5))
    assert tasks.refresh_stale_health() == 1
    assert fleet.api("get", HEALTH).json()["age_seconds"] < 60
    page = Client()
    page.force_login(fleet.user)
    html = page.get("/staff/model-health/").content.decode()
    assert 'id="health-age"' in html and "fresh=true" in html
