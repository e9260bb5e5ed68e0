"""Deployments on a real local Ray Serve fleet: approve -> deploy -> warm -> predict through
the REST API, three tenants sharing the fleet, blue/green and rollback, a killed replica
re-warmed, and a deployment that does not fit leaving the previous version serving.

The fleet controller's passes run in this process (tests/deploy_helpers.settle);
tests/test_fleet_faults.py runs the controller as its own process, and test_promotion_e2e
drives the whole flow through a real worker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from apps.deployments import fleet
from apps.deployments.backends import get_backend, reset_backend
from apps.deployments.controller import Controller, inline_holder
from apps.deployments.dataplane import reset_data_plane
from apps.deployments.models import Deployment, ServingPool, Warmup
from apps.tenants.models import Role
from tests.conftest import Actor, make_actor
from tests.deploy_helpers import GOLDEN_TEXTS, approve, register, settle
from tests.training_helpers import wait_for
from tests.worker.serving.models import PackedModel, pack, train_tiny, variant
from worker.inference import load_classifier

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict[str, PackedModel]:
    """Four distinct tiny models: one trained, three variants (other tenants, a v2)."""
    root = tmp_path_factory.mktemp("models")
    base = train_tiny(root / "base", seed=7)
    models = {"base": pack(base, root / "base.tar")}
    for i, name in enumerate(["v2", "globex", "initech"], start=1):
        models[name] = pack(variant(base, root / name, seed=i, noise=0.2), root / f"{name}.tar")
    return models


@pytest.fixture
def fleet_settings(settings, ray_address, artifacts_dir) -> Any:
    settings.RAY_ADDRESS = ray_address
    settings.SERVING_BACKEND = "ray"
    reset_backend()
    reset_data_plane()
    yield settings
    for pool in ServingPool.objects.all():  # leave the shared Ray empty for the next test
        Deployment.objects.update(status="retired", standby=False)
        fleet.pool_apply(kind=pool.kind, backend=get_backend())
    reset_backend()
    reset_data_plane()


def predict(actor: Actor, slug: str, name: str, texts: list[str], **extra: Any) -> Any:
    return actor.api("post", f"/api/v1/tenants/{slug}/models/{name}/predict",
                     {"inputs": texts, **extra})  # fmt: skip


def expected(model: PackedModel, texts: list[str]) -> list[str]:
    return [p["label"] for p in load_classifier(model.model_dir, device="cpu").predict(texts)]


def test_three_tenants_models_are_deployed_warm_and_predict_like_their_evaluation(
    fleet_settings, packed, tenant, scientist, reviewer, other_tenant, outsider
):
    from apps.tenants import services as tenant_services

    third = tenant_services.tenant_create(actor=None, slug="initech", name="Initech")
    globex_reviewer = make_actor("gina", other_tenant, Role.REVIEWER)
    initech_sci = make_actor("ivan", third, Role.SCIENTIST)
    initech_rev = make_actor("iris", third, Role.REVIEWER)
    versions = {
        "acme": register(scientist, tenant, "intents", packed["base"]),
        "globex": register(outsider, other_tenant, "intents", packed["globex"]),
        "initech": register(initech_sci, third, "intents", packed["initech"]),
    }
    deployments = {
        "acme": approve(scientist, reviewer, versions["acme"], "production"),
        "globex": approve(outsider, globex_reviewer, versions["globex"], "production"),
        "initech": approve(initech_sci, initech_rev, versions["initech"], "production"),
    }
    for slug, deployment in deployments.items():
        deployment.refresh_from_db()
        assert deployment.status == "warm", (slug, deployment.failure)
        assert deployment.promotion.status == "done"
        warmup = Warmup.objects.get(deployment=deployment)
        assert warmup.ok and warmup.samples == len(GOLDEN_TEXTS) and warmup.mismatches == []
        assert warmup.latency_ms_p50 is not None and warmup.latency_ms_p50 > 0
    texts = ["my card has not arrived yet", "why was I charged twice?"]
    callers = {"acme": scientist, "globex": outsider, "initech": initech_sci}
    models = {"acme": "base", "globex": "globex", "initech": "initech"}
    for slug, caller in callers.items():
        response = predict(caller, slug, "intents", texts)
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["model_version"] == versions[slug].pk and body["latency_ms"] > 0
        assert [o["label"] for o in body["outputs"]] == expected(packed[models[slug]], texts)
    # A batch prediction with the deployed model scores rows as the fleet's predict API does.
    fleet_settings.BATCH_CHUNK_ROWS = 25
    _batch_equals_predict(scientist, versions["acme"])
    # Three tenants, one fleet: the fleet reports each model once per replica that holds it.
    status = get_backend().status()
    loaded = {
        m["model_id"]
        for pool in status["pools"]
        for s in pool["sets"]
        for r in s["replicas"]
        for m in r["models"]
    }
    assert {v.pk for v in versions.values()} <= loaded
    # The fleet API names only the caller's own models.
    seen = outsider.api("get", "/api/v1/fleet/").json()
    names = json.dumps(seen)
    assert versions["globex"].pk in names and versions["acme"].pk not in names
    assert "other_tenants_models" in names


def _batch_equals_predict(actor: Actor, version: Any) -> None:
    """A batch job of the production model over 60 banking77 rows (chunks of 25, run here
    by the worker's task function) and the predict API over the same rows: the same label
    and score for each."""
    from apps.batch import services as batch_services
    from apps.batch.tasks import execute_batch
    from tests.training_helpers import banking_slice, make_training_version

    data = make_training_version(actor, name="backlog", content=banking_slice(per_label=10))
    created = actor.api("post", "/api/v1/tenants/acme/batch-predictions/",
                        {"model": "intents", "dataset_version": data})  # fmt: skip
    assert created.status_code == 202 and created.json()["model_version"] == version.pk
    batch_services.batch_dispatch()
    execute_batch.run(created.json()["id"])
    output = actor.api(
        "get", f"/api/v1/tenants/acme/batch-predictions/{created.json()['id']}/output"
    )
    assert output.status_code == 200, output.content
    rows = [json.loads(line) for line in b"".join(output.streaming_content).splitlines()]
    texts = [r["text"] for r in rows]
    assert len(texts) == 60
    served = predict(actor, "acme", "intents", texts).json()["outputs"]
    assert [r["label"] for r in rows] == [o["label"] for o in served]
    assert [r["score"] for r in rows] == pytest.approx([o["score"] for o in served], abs=1e-5)


def test_blue_green_then_rollback_to_the_standby(
    fleet_settings, packed, tenant, scientist, reviewer
):
    v1 = register(scientist, tenant, "intents", packed["base"])
    first = approve(scientist, reviewer, v1, "production")
    v2 = register(scientist, tenant, "intents", packed["v2"])
    assert v2.registered_model_id == v1.registered_model_id and v2.number == 2
    second = approve(scientist, reviewer, v2, "production")
    second.refresh_from_db()
    first.refresh_from_db()
    assert second.status == "warm" and second.replaces_id == first.pk
    assert first.status == "retired" and first.standby is True  # still loaded, in the tail
    texts = ["my card has not arrived yet"]
    body = predict(scientist, "acme", "intents", texts).json()
    assert body["model_version"] == v2.pk
    assert [o["label"] for o in body["outputs"]] == expected(packed["v2"], texts)

    response = reviewer.api("post", f"/api/v1/tenants/acme/deployments/{second.pk}/rollback")
    assert response.status_code == 202, response.content
    settle(response.json()["id"])
    rollback = Deployment.objects.get(pk=response.json()["id"])
    assert rollback.status == "warm" and rollback.model_version_id == v1.pk
    body = predict(scientist, "acme", "intents", texts).json()
    assert body["model_version"] == v1.pk
    assert [o["label"] for o in body["outputs"]] == expected(packed["base"], texts)
    second.refresh_from_db()
    assert second.status == "retired" and second.standby is True


def test_a_deployment_that_does_not_fit_fails_and_the_previous_version_keeps_serving(
    fleet_settings, packed, tenant, scientist, reviewer
):
    v1 = register(scientist, tenant, "intents", packed["base"])
    first = approve(scientist, reviewer, v1, "production")
    first.refresh_from_db()
    assert first.status == "warm"
    # Shrink the pool: one set, room for one model only.
    ServingPool.objects.filter(kind="classifier").update(
        max_sets=1, replica_memory_bytes=v1.memory_bytes + 10
    )
    v2 = register(scientist, tenant, "intents", packed["v2"])
    second = approve(scientist, reviewer, v2, "production")
    second.refresh_from_db()
    assert second.status == "failed"
    assert second.failure.startswith("insufficient capacity: need ")
    assert second.promotion.status == "failed" and "insufficient capacity" in (
        second.promotion.failure
    )
    body = predict(scientist, "acme", "intents", ["my card has not arrived yet"]).json()
    assert body["model_version"] == v1.pk


def test_a_killed_replica_comes_back_and_is_rewarmed(
    fleet_settings, packed, tenant, scientist, reviewer
):
    import ray

    version = register(scientist, tenant, "intents", packed["base"])
    deployment = approve(scientist, reviewer, version, "production")
    deployment.refresh_from_db()
    assert deployment.status == "warm" and deployment.replica_set is not None
    set_name = f"classifier-set-{deployment.replica_set}"

    def holders() -> set[str]:
        return {
            r["replica_id"]
            for pool in get_backend().status()["pools"]
            for s in pool["sets"]
            if s["name"] == set_name
            for r in s["replicas"]
            if any(m["model_id"] == version.pk and m["loaded"] for m in r["models"])
        }

    before = wait_for(holders, timeout=30)
    controller = Controller(holder=inline_holder())
    controller.reconcile()  # the first look remembers the replicas
    warmups = Warmup.objects.filter(deployment=deployment).count()
    backend: Any = get_backend()
    (victim, *_) = backend.replica_actors("classifier", set_name)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    # Serve replaces the dead replica; the new one loads the set's models by itself.
    wait_for(lambda: (holders() - before) or None, timeout=120)
    # The controller sees a new replica, re-warms the model on it (and counts one restart,
    # not an alert).
    report = controller.reconcile()
    assert report.warmups >= 1, report
    assert Warmup.objects.filter(deployment=deployment).count() == warmups + 1
    rewarm = Warmup.objects.filter(deployment=deployment).order_by("-started_at").first()
    assert rewarm is not None and rewarm.trigger == "replica_restart" and rewarm.ok
    body = predict(scientist, "acme", "intents", ["my card has not arrived yet"]).json()
    assert body["model_version"] == version.pk


def test_a_pool_the_fleet_lost_is_applied_again_and_serves_as_before(
    fleet_settings, packed, tenant, scientist, reviewer
):
    version = register(scientist, tenant, "intents", packed["base"])
    deployment = approve(scientist, reviewer, version, "production")
    texts = ["my card has not arrived yet", "why was I charged twice?"]
    assert predict(scientist, "acme", "intents", texts).status_code == 200
    # The fleet loses the pool (what a new Ray head looks like to Serve): predictions get
    # a quick 503 naming the cause, never a 500 or a hang.
    get_backend().shutdown_pool("classifier")  # type: ignore[attr-defined]
    lost = predict(scientist, "acme", "intents", texts)
    assert lost.status_code == 503 and lost["Retry-After"] == "2"
    assert lost.json()["error"]["code"] == "model_unavailable"
    # The controller's next passes put it back; the deployment is warm (verified) again.
    settle()
    report = Controller(holder=inline_holder()).reconcile()
    deployment.refresh_from_db()
    assert deployment.status == "warm", (deployment.failure, report)
    body = predict(scientist, "acme", "intents", texts).json()
    assert [o["label"] for o in body["outputs"]] == expected(packed["base"], texts)
    assert ServingPool.objects.get(kind="classifier").routes["models"][version.pk]


def test_a_warmup_mismatch_shows_only_the_tenants_own_golden_text(
    fleet_settings, packed, tenant, scientist, reviewer, admin, staff, client
):
    from datetime import timedelta

    from django.core import mail
    from django.utils import timezone

    from apps.datasets.models import Dataset, DatasetVersion
    from apps.deployments.models import FleetAlert
    from apps.evaluation.models import Evaluation

    shared_text = "shared-set row: staff eyes only"
    version = register(scientist, tenant, "intents", packed["base"])
    # The tenant's own golden evaluation recorded a prediction the fleet will not repeat...
    own = Evaluation.objects.get(model_version=version)
    samples = [dict(s) for s in own.samples]
    samples[0]["predicted"] = "no_such_label"
    Evaluation.objects.filter(pk=own.pk).update(
        samples=samples, finished_at=timezone.now() - timedelta(minutes=5)
    )
    # ...and so did a later evaluation on a shared (staff-owned) golden set of its domain.
    dataset = Dataset.objects.create(tenant=None, name="banking-shared", kind="golden",
                                     domain="banking")  # fmt: skip
    data = DatasetVersion.objects.create(
        dataset=dataset, number=1, sha256="5e" * 32, size_bytes=1, rows=1, format="csv",
        storage_key="x/shared", text_column="text", label_column="label", labels={"a": 1},
        duplicate_texts=0, preview=[],
    )  # fmt: skip
    Evaluation.objects.create(
        tenant=tenant, model_version=version, dataset_version=data, status="succeeded",
        artifact_sha256=version.sha256, metrics={"macro_f1": 0.9}, finished_at=timezone.now(),
        samples=[{"text": shared_text, "label": "a", "predicted": "no_such_label", "score": 1.0}],
    )  # fmt: skip
    mail.outbox.clear()
    deployment = approve(scientist, reviewer, version, "production")
    deployment.refresh_from_db()
    assert deployment.status == "failed"
    warmup = Warmup.objects.get(deployment=deployment)
    assert [m["text"] for m in warmup.mismatches] == [GOLDEN_TEXTS[0]]
    client.force_login(scientist.user)
    api = scientist.api("get", f"/api/v1/tenants/acme/deployments/{deployment.pk}/")
    page = client.get(f"/t/acme/deployments/{deployment.pk}/").content.decode()
    seen_by_tenant = {
        "api": json.dumps(api.json()),
        "page": page,
        "failure": deployment.failure,
        "promotion": deployment.promotion.failure,
        "alerts": " ".join(FleetAlert.objects.values_list("message", flat=True)),
        "mail": " ".join(m.body for m in mail.outbox),
    }
    assert GOLDEN_TEXTS[0] in seen_by_tenant["api"] and GOLDEN_TEXTS[0] in seen_by_tenant["mail"]
    for where, text in seen_by_tenant.items():
        assert shared_text not in text, where
