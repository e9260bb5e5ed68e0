"""A running evaluation is leased: stale ones are never reused, the reaper re-queues them
(failing them after their last attempt), a superseded attempt writes nothing, and a worker
SIGKILLed mid-evaluation costs the promotion a few seconds, not its decision."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction
from django.utils import timezone

from apps.audit.models import AuditEvent
from apps.core.artifacts import get_store
from apps.datasets.models import DatasetVersion
from apps.evaluation import services
from apps.evaluation.models import Evaluation
from apps.promotions.models import PromotionRequest
from apps.registry.models import ModelVersion
from apps.training import runner
from apps.training import services as training
from tests.conftest import start_worker, stop_worker
from tests.training_helpers import (
    banking_slice,
    make_training_version,
    placeholder_version,
    wait_for,
)

API = "/api/v1/tenants/acme"


@pytest.fixture
def candidate(scientist, tenant, artifacts_dir) -> ModelVersion:
    return placeholder_version(scientist, tenant, sha256="ef" * 32)


def request_promotion(actor: Any, version: ModelVersion, target: str) -> dict[str, Any]:
    response = actor.api("post", f"{API}/promotions/", {"model_version": version.pk,
                                                        "target": target})  # fmt: skip
    assert response.status_code == 202, response.content
    return dict(response.json())


def silent_since(evaluation_id: str, minutes: int) -> None:
    """Its worker's last heartbeat was ``minutes`` ago (the worker is gone)."""
    Evaluation.objects.filter(pk=evaluation_id).update(
        heartbeat_at=timezone.now() - timedelta(minutes=minutes)
    )


@pytest.mark.django_db
def test_a_stale_running_evaluation_is_not_reused_by_a_new_promotion_request(
    scientist, reviewer, candidate
):
    make_training_version(reviewer, name="golden", kind="golden")
    (live,) = request_promotion(scientist, candidate, "staging")["evaluation_ids"]
    assert services.evaluation_claim(evaluation_id=live, worker="busy:1") is not None
    silent_since(live, minutes=10)

    (fresh,) = request_promotion(scientist, candidate, "production")["evaluation_ids"]
    assert fresh != live
    assert Evaluation.objects.get(pk=fresh).status == "queued"


@pytest.mark.django_db
def test_a_stale_evaluation_is_requeued_and_fails_after_its_last_attempt_with_its_promotion(
    scientist, reviewer, candidate, settings
):
    settings.EVALUATION_MAX_ATTEMPTS = 2
    make_training_version(reviewer, name="golden", kind="golden")
    promotion = request_promotion(scientist, candidate, "staging")
    (evaluation_id,) = promotion["evaluation_ids"]
    services.evaluation_claim(evaluation_id=evaluation_id, worker="first:1")
    # A fresh heartbeat is left alone.
    assert services.evaluations_requeue_stale() == []
    silent_since(evaluation_id, minutes=1)

    assert services.evaluations_requeue_stale() == [evaluation_id]
    requeued = Evaluation.objects.get(pk=evaluation_id)
    assert requeued.status == "queued" and requeued.attempt == 1
    event = AuditEvent.objects.get(object_id=evaluation_id, verb="evaluation.requeue")
    assert event.before is not None and event.before["worker"] == "first:1"
    assert event.after is not None and event.after["reason"] == "heartbeat stale"

    second = services.evaluation_claim(evaluation_id=evaluation_id, worker="second:2")
    assert second is not None and second.attempt == 2
    # The first worker, should it wake up, is fenced off: its lease and result are refused.
    assert not services.evaluation_heartbeat(evaluation_id=evaluation_id, attempt=1)
    assert services.evaluation_finish(evaluation_id=evaluation_id, attempt=1,
                                      metrics={"macro_f1": 0.99}) is None  # fmt: skip
    assert Evaluation.objects.get(pk=evaluation_id).metrics == {}

    silent_since(evaluation_id, minutes=1)
    assert services.evaluations_requeue_stale() == []
    failed = Evaluation.objects.get(pk=evaluation_id)
    assert failed.status == "failed"
    assert "lost 2 times (the last: second:2)" in failed.error

    from apps.promotions.services import promotion_check

    promotion_check(promotion_id=promotion["id"])
    body = scientist.api("get", f"{API}/promotions/{promotion['id']}/").json()
    assert body["status"] == "failed"
    assert (
        f"evaluation {evaluation_id} failed: The worker evaluating it was lost" in (body["failure"])
    )


def registered_version(actor: Any, tenant: Any, tmp_path: Path) -> ModelVersion:
    """A tiny model trained in this process and registered as a finished run registers it
    (claimed and finished in one transaction: no worker trains the run)."""
    from tests.worker.serving.models import pack, train_tiny
    from worker.inference import load_classifier

    model = pack(train_tiny(tmp_path / "train", seed=3), tmp_path / "model.tar")
    labels = list(load_classifier(model.model_dir, device="cpu").labels)
    data = DatasetVersion.objects.get(pk=make_training_version(actor))
    with transaction.atomic():
        run = training.run_launch(
            actor=actor.user, tenant=tenant, dataset_version=data, base_model="tiny-bert",
            params={}, model_name="intents",
        )  # fmt: skip
        assert training.run_claim(run_id=run.pk, worker="this-test:1") is not None
        key = f"{runner.model_prefix(tenant.pk, run.pk, 1)}/model.tar"
        get_store().put_file(key, model.tar)
        training.run_succeed(
            run_id=run.pk, attempt=1, metrics={}, stop_reason="completed", stop_detail="",
            progress={}, version_fields={
                "artifact_key": key, "sha256": model.sha256, "size_bytes": model.size,
                "memory_bytes": 4 * model.size, "predictions_key": "", "labels": labels,
                "metrics": {},
            },
        )  # fmt: skip
    return ModelVersion.objects.get(run_id=run.pk)


@pytest.mark.django_db(transaction=True)
@pytest.mark.celery_worker
def test_a_worker_killed_mid_evaluation_is_replaced_and_the_promotion_reaches_its_decision(
    celery_worker_process, scientist, reviewer, admin, tenant, settings, tmp_path
):
    settings.ARTIFACT_STORE = f"file://{celery_worker_process.artifacts_root}"
    version = registered_version(scientist, tenant, tmp_path)
    # 2,310 rows: several seconds of evaluation on a CPU, time to kill the worker in them.
    make_training_version(reviewer, name="golden", kind="golden",
                          content=banking_slice(labels=77, per_label=30))  # fmt: skip
    policy = {"gates": [{"metric": "macro_f1", "op": ">=", "value": 0.0}]}
    assert admin.api("put", f"{API}/policies/classifier/", policy).status_code == 200
    promotion = request_promotion(scientist, version, "staging")
    (evaluation_id,) = promotion["evaluation_ids"]

    def running() -> Evaluation | None:
        evaluation = Evaluation.objects.get(pk=evaluation_id)
        return evaluation if evaluation.status == "running" else None

    claimed = wait_for(running, timeout=120, every=0.05)
    # SIGKILL the whole worker (main process and pool), as an OOM kill or spot reclaim would.
    stop_worker(celery_worker_process, kill=True)
    killed_at = time.monotonic()
    assert Evaluation.objects.get(pk=evaluation_id).status == "running"  # mid-evaluation

    # Another worker, running beat: its reaper re-queues the evaluation once the lease
    # (5 s here) has run out. The session's fixture owns the new worker from here on.
    kwargs = dict(celery_worker_process.start_kwargs or {})
    rescuer = start_worker(**kwargs, name="evaluation-rescuer", beat=True)
    celery_worker_process.process = rescuer.process
    celery_worker_process.log_path = rescuer.log_path
    celery_worker_process.node = rescuer.node

    def decided() -> str | None:
        status = PromotionRequest.objects.get(pk=promotion["id"]).status
        return status if status != "checking" else None

    status = wait_for(decided, timeout=240)
    print(f"\nthe promotion reached {status} {time.monotonic() - killed_at:.1f} s after the kill")
    body = scientist.api("get", f"{API}/promotions/{promotion['id']}/").json()
    assert status == "awaiting_approval", body
    evaluation = Evaluation.objects.get(pk=evaluation_id)
    assert evaluation.status == "succeeded" and evaluation.attempt == 2
    assert evaluation.metrics["rows"] == 77 * 30
    requeue = AuditEvent.objects.get(object_id=evaluation_id, verb="evaluation.requeue")
    assert requeue.before is not None and requeue.before["worker"] == claimed.claimed_by


@pytest.mark.django_db
def test_an_evaluation_whose_holder_died_on_this_host_is_requeued_without_waiting_out_its_lease(
    scientist, reviewer, candidate
):
    import socket
    import subprocess
    import sys

    make_training_version(reviewer, name="golden", kind="golden")
    (evaluation_id,) = request_promotion(scientist, candidate, "staging")["evaluation_ids"]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # its pid names no process now
    holder = f"{socket.gethostname()}:{child.pid}"
    assert services.evaluation_claim(evaluation_id=evaluation_id, worker=holder) is not None
    # The lease is fresh, yet the holder is known gone: re-queued at the next sweep.
    assert services.evaluations_requeue_stale() == [evaluation_id]
    assert Evaluation.objects.get(pk=evaluation_id).status == "queued"
    event = AuditEvent.objects.get(object_id=evaluation_id, verb="evaluation.requeue")
    assert event.after is not None and event.after["reason"] == "worker process gone"
