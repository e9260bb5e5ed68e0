"""Deploying a real tiny model through the workbench's services: shared by the fleet
tests and the serving benchmarks. The fleet controller's passes run in this process
(:func:`settle`); the fault-injection tests run it as its own process."""

from __future__ import annotations

from typing import Any

from apps.core.artifacts import get_store
from apps.deployments.models import Deployment
from apps.evaluation.models import EvalStatus, Evaluation
from apps.promotions import services as promotions
from apps.promotions.models import PromotionRequest
from apps.registry.models import ModelVersion
from apps.registry.services import model_version_create
from apps.tenants.models import Tenant
from apps.training import services as training
from tests.worker.serving.models import PackedModel
from worker.inference import load_classifier

GOLDEN_TEXTS = [
    "I still have not received my new card",
    "my card payment was declined",
    "how do I top up by bank transfer",
    "what is the exchange rate",
    "I want to change my PIN",
    "there is a charge I did not make",
]


def register(actor: Any, tenant: Tenant, name: str, model: PackedModel) -> ModelVersion:
    """A model version as a training run registers it, evaluated on a golden set whose
    predictions were computed by reloading the artifact (what the evaluation task does)."""
    from apps.datasets.models import Dataset, DatasetVersion

    dataset = Dataset.objects.create(tenant=tenant, name=f"{name}-{model.sha256[:8]}",
                                     kind="training")  # fmt: skip
    data = DatasetVersion.objects.create(
        dataset=dataset, number=1, sha256=model.sha256, size_bytes=1, rows=10, format="csv",
        storage_key=f"x/{name}", text_column="text", label_column="label", labels={"a": 10},
        duplicate_texts=0, preview=[],
    )  # fmt: skip
    run = training.run_launch(actor=actor.user, tenant=tenant, dataset_version=data,
                              base_model="tiny-bert", params={}, model_name=name)  # fmt: skip
    key = f"models/{tenant.slug}/{run.pk}/model.tar"
    get_store().put_file(key, model.tar)
    classifier = load_classifier(model.model_dir, device="cpu")
    predictions = classifier.predict(GOLDEN_TEXTS)
    version = model_version_create(
        run=run, artifact_key=key, sha256=model.sha256, size_bytes=model.size,
        memory_bytes=4 * model.size, predictions_key="", labels=list(classifier.labels),
        metrics={},
    )  # fmt: skip
    Evaluation.objects.create(
        tenant=tenant, model_version=version, dataset_version=data, status=EvalStatus.SUCCEEDED,
        artifact_sha256=model.sha256, metrics={"macro_f1": 0.9},
        samples=[{"text": t, "label": p["label"], "predicted": p["label"], "score": p["score"]}
                 for t, p in zip(GOLDEN_TEXTS, predictions, strict=True)],
    )  # fmt: skip
    return version


def settle(*deployment_ids: str, timeout_s: float = 180.0) -> None:
    """Run fleet controller passes in this process until none of these deployments (or of
    any, when none is named) is pending or loading, then one more pass for what follows
    (the replaced version moving to the long tail)."""
    from apps.deployments.controller import reconcile_until

    busy = Deployment.objects.filter(status__in=["pending", "loading"])
    if deployment_ids:
        busy = busy.filter(pk__in=deployment_ids)
    reconcile_until(lambda: not busy.exists(), timeout_s=timeout_s)
    reconcile_until(lambda: True)


def approve(requester: Any, reviewer: Any, version: ModelVersion, target: str) -> Deployment:
    """An approved promotion; the deployment it creates loads before this returns."""
    promotion = PromotionRequest.objects.create(
        tenant=version.registered_model.tenant, model_version=version, target=target,
        artifact_sha256=version.sha256, status="awaiting_approval", requested_by=requester.user,
    )  # fmt: skip
    promotions.promotion_approve(actor=reviewer.user, promotion=promotion, comment="ok")
    deployment = Deployment.objects.get(promotion=promotion)
    settle(deployment.pk)
    return deployment
