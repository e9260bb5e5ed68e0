"""Train, evaluate on a golden set on a real worker, pass the gates, approve: the MLflow
registry alias moves to the approved version, and the fleet controller (its own process)
deploys it onto the real Ray fleet, where it answers the REST API's predict like the
evaluation said it would — for a whole tiny BERT and for a LoRA adapter on the shared
MiniLM alike."""

from __future__ import annotations

import pytest

from apps.audit.models import AuditEvent
from apps.evaluation.models import Evaluation
from apps.registry.models import ModelVersion
from apps.training.models import TrainingRun
from tests.training_helpers import banking_slice, make_training_version, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]
API = "/api/v1/tenants/acme"


# (base model, its params): a full model trained from scratch, and an adapter.
BASES = {
    "tiny-bert": {"epochs": 3, "learning_rate": 0.003, "max_length": 32},
    "minilm-l6-lora": {"epochs": 2, "learning_rate": 0.003, "max_length": 32, "lora_r": 4},
}


@pytest.mark.parametrize("base_model", list(BASES))
def test_promotion_end_to_end_moves_the_mlflow_alias_and_serves_the_model(
    base_model,
    celery_worker_process,
    fleet_controller_process,
    mlflow_server,
    ray_address,
    scientist,
    reviewer,
    admin,
    settings,
):
    from apps.deployments.backends import reset_backend

    settings.ARTIFACT_STORE = f"file://{celery_worker_process.artifacts_root}"
    settings.MLFLOW_TRACKING_URI = mlflow_server
    settings.RAY_ADDRESS = ray_address
    reset_backend()
    train_version = make_training_version(scientist, content=banking_slice(per_label=40))
    make_training_version(reviewer, name="golden", kind="golden",
                          content=banking_slice(per_label=10, offset=40))  # fmt: skip
    policy = {"gates": [{"metric": "macro_f1", "op": ">=", "value": 0.2}],
              "latency_budget_ms": 5000}  # fmt: skip
    assert admin.api("put", f"{API}/policies/classifier/", policy).status_code == 200
    launch = {"dataset_version": train_version, "base_model": base_model, "model_name": "promoted",
              "params": BASES[base_model]}  # fmt: skip
    run_id = scientist.api("post", f"{API}/runs/", launch).json()["id"]
    wait_for(lambda: TrainingRun.objects.get(pk=run_id).status in ("succeeded", "failed"),
             timeout=240)  # fmt: skip
    version = ModelVersion.objects.get(run_id=run_id)
    if base_model == "minilm-l6-lora":
        # Only what the tenant adds is the version's: the 87 MB base is shared.
        assert version.format == "adapter" and len(version.base_sha256) == 64
        assert version.memory_bytes < 500_000 < 80_000_000 < version.base_memory_bytes
    else:
        assert version.format == "full" and version.base_sha256 == ""

    response = scientist.api("post", f"{API}/promotions/",
                             {"model_version": version.pk, "target": "staging"})  # fmt: skip
    assert response.status_code == 202, response.content
    promotion_id = response.json()["id"]

    def decided_by_gates() -> str | None:
        status = scientist.api("get", f"{API}/promotions/{promotion_id}/").json()["status"]
        return status if status != "checking" else None

    status = wait_for(decided_by_gates, timeout=180)
    body = scientist.api("get", f"{API}/promotions/{promotion_id}/").json()
    assert status == "awaiting_approval", body
    evaluation = Evaluation.objects.get(pk=body["evaluation_ids"][0])
    assert evaluation.artifact_sha256 == version.sha256
    metrics = evaluation.metrics
    assert metrics["rows"] == 60 and len(metrics["confusion"]) >= 6
    assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p95"]
    assert metrics["mlflow_logged"] is True

    approved = reviewer.api("post", f"{API}/promotions/{promotion_id}/approve", {"comment": "ok"})
    assert approved.status_code == 200 and approved.json()["status"] == "deploying"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    aliased = wait_for(lambda: _alias_version(client, "acme.promoted", "staging"), timeout=20)
    assert aliased == version.mlflow_version
    mlflow_run = client.get_run(TrainingRun.objects.get(pk=run_id).mlflow_run_id)
    assert "eval.golden.macro_f1" in mlflow_run.data.metrics

    # The controller deploys it: loaded on the fleet, warmed up with the golden samples.
    def deployed() -> str | None:
        status = scientist.api("get", f"{API}/promotions/{promotion_id}/").json()["status"]
        return status if status != "deploying" else None

    outcome = wait_for(deployed, timeout=240)
    assert outcome == "done", scientist.api("get", f"{API}/deployments/").json()
    (deployment,) = scientist.api("get", f"{API}/deployments/").json()["results"]
    assert deployment["status"] == "warm" and deployment["environment"] == "staging"
    detail = scientist.api("get", f"{API}/deployments/{deployment['id']}/").json()
    (warmup,) = detail["warmups"]
    assert warmup["ok"] and warmup["samples"] == len(evaluation.samples) > 0
    samples = evaluation.samples[:5]
    body = {"inputs": [s["text"] for s in samples], "environment": "staging"}
    answer = scientist.api("post", f"{API}/models/promoted/predict", body)
    assert answer.status_code == 200, answer.content
    assert answer.json()["model_version"] == version.pk
    assert [o["label"] for o in answer.json()["outputs"]] == [s["predicted"] for s in samples]
    # The promotion's own history records each step after the approval.
    verbs = AuditEvent.objects.filter(object_id=promotion_id).order_by("created_at")
    assert [v for v in verbs.values_list("verb", flat=True) if v.startswith("promotion.")][-3:] == [
        "promotion.approved", "promotion.deploying", "promotion.done",
    ]  # fmt: skip
    reset_backend()


def _alias_version(client, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        return None
