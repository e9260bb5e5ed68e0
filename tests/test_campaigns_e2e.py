"""A retraining campaign over four tenants on a real worker, through the REST API: one tenant
has no data, one's gates fail, two pass; the campaign's own requester cannot approve them,
a second staff reviewer approves "passing" in one action, and the fleet controller deploys
both onto the real Ray fleet, warm."""

from __future__ import annotations

import pytest

from apps.audit.models import AuditEvent
from apps.promotions.models import PromotionRequest
from apps.tenants.models import Role, Tenant
from apps.tenants.services import membership_add, tenant_create
from apps.training.models import TrainingRun
from tests.conftest import make_actor
from tests.training_helpers import banking_slice, make_training_version, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]
CAMPAIGNS = "/api/v1/campaigns/"
EASY = {"gates": [{"metric": "macro_f1", "op": ">=", "value": 0.2}], "latency_budget_ms": 5000}
IMPOSSIBLE = {"gates": [{"metric": "macro_f1", "op": ">=", "value": 0.999}],
              "latency_budget_ms": 5000}  # fmt: skip


def test_a_campaign_trains_gates_and_deploys_in_every_tenant_that_passes(
    celery_worker_process, fleet_controller_process, mlflow_server, ray_address, tenant,
    settings,
):  # fmt: skip
    from apps.deployments.backends import reset_backend

    settings.ARTIFACT_STORE = f"file://{celery_worker_process.artifacts_root}"
    settings.MLFLOW_TRACKING_URI = mlflow_server
    settings.RAY_ADDRESS = ray_address
    reset_backend()
    for slug in ("beta", "gamma", "delta"):
        tenant_create(actor=None, slug=slug, name=slug.title(), domain="banking")
    owner = make_actor("olga", tenant, Role.ADMIN)  # uploads the data and sets the policies
    reviewer = make_actor("rex", tenant, Role.REVIEWER, is_staff=True)
    for slug in ("beta", "gamma", "delta"):
        other = Tenant.objects.get(slug=slug)
        membership_add(actor=None, tenant=other, user=owner.user, role=Role.ADMIN)
        membership_add(actor=None, tenant=other, user=reviewer.user, role=Role.REVIEWER)
    for slug, policy in (("acme", EASY), ("beta", EASY), ("delta", IMPOSSIBLE)):
        make_training_version(owner, tenant=slug, content=banking_slice(per_label=40))
        make_training_version(owner, tenant=slug, name="golden", kind="golden",
                              content=banking_slice(per_label=10, offset=40))  # fmt: skip
        put = owner.api("put", f"/api/v1/tenants/{slug}/policies/classifier/", policy)
        assert put.status_code == 200, put.content
    staff = make_actor("stella", None, None, is_staff=True)

    body = {"name": "q4 refresh", "model_name": "intents", "tenants": "all",
            "recipe": {"base_model": "tiny-bert",
                       "params": {"epochs": 3, "learning_rate": 0.003, "max_length": 32}},
            "target": "staging"}  # fmt: skip
    created = staff.api("post", CAMPAIGNS, body)
    assert created.status_code == 201, created.content
    campaign_id = created.json()["id"]

    def settled() -> dict | None:
        campaign = staff.api("get", f"{CAMPAIGNS}{campaign_id}/").json()
        counts = campaign["progress"]["counts"]
        moving = sum(counts.get(s, 0) for s in ("pending", "training", "checking"))
        return campaign if not moving else None

    campaign = wait_for(settled, timeout=600, every=1.0)
    assert campaign["progress"]["counts"] == {"awaiting_approval": 2, "skipped": 2}, campaign
    assert campaign["progress"]["skipped"] == {"no_data": 1, "gates_failed": 1}
    assert campaign["progress"]["gpu_seconds"] > 0
    assert campaign["progress"]["longest_start_delay_s"] >= 0
    items = {i["tenant"]: i for i in staff.api("get", f"{CAMPAIGNS}{campaign_id}/items/").json()[
        "results"]}  # fmt: skip
    assert "macro_f1" in items["delta"]["detail"] and "0.999" in items["delta"]["detail"]
    passing = [items[s]["promotion"] for s in ("acme", "beta")]
    assert all(p["passed"] and not p["regressed"] for p in passing), passing
    assert all(
        any(g["metric"] == "macro_f1" and g["threshold"] == 0.2 and g["value"] >= 0.2
            for g in p["gates"])
        for p in passing
    )  # fmt: skip
    assert TrainingRun.objects.filter(campaign_item__campaign_id=campaign_id).count() == 3

    # Four eyes: the campaign's requester (who launched its runs) decides nothing.
    refused = staff.api("post", f"{CAMPAIGNS}{campaign_id}/approve", {"promotions": "passing"})
    assert refused.status_code == 200, refused.content
    assert refused.json()["decided"] == []
    assert {f["code"] for f in refused.json()["failed"]} == {"four_eyes"}
    approved = reviewer.api("post", f"{CAMPAIGNS}{campaign_id}/approve",
                            {"promotions": "passing", "comment": "q4 looks good"})  # fmt: skip
    assert approved.status_code == 200, approved.content
    assert sorted(d["tenant"] for d in approved.json()["decided"]) == ["acme", "beta"]
    assert approved.json()["failed"] == []

    def deployed() -> dict | None:
        campaign = staff.api("get", f"{CAMPAIGNS}{campaign_id}/").json()
        counts = campaign["progress"]["counts"]
        return campaign if counts.get("done") == 2 or counts.get("failed") else None

    campaign = wait_for(deployed, timeout=300, every=1.0)
    assert campaign["progress"]["counts"] == {"done": 2, "skipped": 2}, campaign
    assert campaign["status"] == "finished"
    for slug in ("acme", "beta"):
        (deployment,) = owner.api("get", f"/api/v1/tenants/{slug}/deployments/").json()["results"]
        assert deployment["status"] == "warm" and deployment["environment"] == "staging"
        answer = owner.api("post", f"/api/v1/tenants/{slug}/models/intents/predict",
                           {"inputs": ["I still have not received my card"],
                            "environment": "staging"})  # fmt: skip
        assert answer.status_code == 200, answer.content
    # Each approval is audited in its tenant; the batch once, on the campaign.
    decided = AuditEvent.objects.filter(verb="promotion.approved", actor=reviewer.user)
    assert sorted(decided.values_list("tenant__slug", flat=True)) == ["acme", "beta"]
    assert AuditEvent.objects.filter(verb="campaign.approve", object_id=campaign_id).count() == 2
    reset_backend()


def test_a_worker_killed_mid_campaign_loses_nothing_and_launches_nothing_twice(
    celery_worker_process, tenant, settings
):
    """SIGKILL the worker while the campaign's first run trains: a rescuer (beat too)
    re-queues that run, which resumes, and sends again the one whose message died with the
    worker; every tenant ends with one run and one promotion request."""
    from tests.conftest import start_worker, stop_worker

    settings.ARTIFACT_STORE = f"file://{celery_worker_process.artifacts_root}"
    tenant_create(actor=None, slug="beta", name="Beta", domain="banking")
    owner = make_actor("olga", tenant, Role.ADMIN)
    membership_add(actor=None, tenant=Tenant.objects.get(slug="beta"), user=owner.user,
                   role=Role.ADMIN)  # fmt: skip
    for slug in ("acme", "beta"):
        make_training_version(owner, tenant=slug, content=banking_slice(per_label=40))
        make_training_version(owner, tenant=slug, name="golden", kind="golden",
                              content=banking_slice(per_label=10, offset=40))  # fmt: skip
        assert owner.api("put", f"/api/v1/tenants/{slug}/policies/classifier/",
                         EASY).status_code == 200  # fmt: skip
    staff = make_actor("stella", None, None, is_staff=True)
    body = {"model_name": "intents", "tenants": ["acme", "beta"], "target": "staging",
            "recipe": {"base_model": "tiny-bert",
                       "params": {"epochs": 8, "batch_size": 8, "learning_rate": 0.003,
                                  "max_length": 32, "checkpoint_every_steps": 4,
                                  "checkpoint_min_seconds": 0}}}  # fmt: skip
    campaign_id = staff.api("post", CAMPAIGNS, body).json()["id"]
    runs = TrainingRun.objects.filter(campaign_item__campaign_id=campaign_id)
    wait_for(lambda: runs.filter(status="running", checkpoint_step__gte=8).exists(), timeout=240)
    original = dict(celery_worker_process.start_kwargs or {})
    stop_worker(celery_worker_process, kill=True)
    killed = runs.get(status="running")

    rescue = {**original, "extra_env": {**(original.get("extra_env") or {}),
                                        "TRAINING_DISPATCH_TIMEOUT_SECONDS": "10"}}  # fmt: skip
    rescuer = start_worker(**rescue, name="campaign-rescuer", beat=True)
    try:

        def settled() -> dict | None:
            counts = staff.api("get", f"{CAMPAIGNS}{campaign_id}/").json()["progress"]["counts"]
            return counts if counts.get("awaiting_approval", 0) + counts.get("skipped", 0) == 2 \
                else None  # fmt: skip

        counts = wait_for(settled, timeout=480, every=1.0)
        assert counts == {"awaiting_approval": 2}, (counts, rescuer.log()[-3000:])
        assert runs.count() == 2 and set(runs.values_list("status", flat=True)) == {"succeeded"}
        assert runs.get(pk=killed.pk).attempt == 2  # resumed, not launched again
        assert PromotionRequest.objects.filter(campaign_item__campaign_id=campaign_id).count() == 2
        assert TrainingRun.objects.count() == 2
    finally:
        # The session's worker again, with the session's settings.
        stop_worker(rescuer)
        fresh = start_worker(**original, name="worker-after-rescue")
        celery_worker_process.process = fresh.process
        celery_worker_process.log_path = fresh.log_path
        celery_worker_process.node = fresh.node
